//! The projection threads' CPU priority.
//!
//! Projections are eventually consistent and work in large batches; commands
//! wait for a client. On a small machine both compete for the same cores, and
//! a projection batch that holds a core for a few milliseconds shows up
//! directly in command tail latency (BENCHMARKS.md measured a command p99 of
//! 125 ms at 1,000 commands/s with projections at the same priority, 14 ms
//! with them at nice 10, and 5 ms with no projections at all). So projection
//! workers, and the tantivy threads their search indexes start, run at a
//! higher nice value: under load the command side is scheduled first, and
//! when it is idle projections still get every spare cycle.

/// Raises the nice value of the calling thread (not the whole process: on
/// Linux, `setpriority` with a thread id affects that thread only). Threads
/// it starts afterwards inherit the value. Lowering one's own priority needs
/// no privilege, so a failure is only logged.
pub(super) fn lower_current_thread(nice: i32) {
    if nice == 0 {
        return;
    }
    let tid = rustix::thread::gettid();
    if let Err(error) = rustix::process::setpriority_process(Some(tid), nice) {
        tracing::warn!(nice, %error, "cannot lower the priority of a projection thread");
    }
}

/// Runs `work` on a short-lived thread at the projections' priority, so that
/// threads it starts (tantivy's indexing and merge threads) inherit it.
pub(super) fn at_projection_priority<T: Send>(
    nice: i32,
    work: impl FnOnce() -> T + Send,
) -> std::io::Result<T> {
    if nice == 0 {
        return Ok(work());
    }
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name("cqrsd-proj-open".to_owned())
            .spawn_scoped(scope, || {
                lower_current_thread(nice);
                work()
            })?;
        // A panic while opening is a bug; it surfaces as it would have inline.
        Ok(thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
    })
}
