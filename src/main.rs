// glibc's malloc was 15-20% of the daemon's CPU samples under load (see
// BENCHMARKS.md): every command and every projected event allocates many
// small JSON and record buffers across threads, which mimalloc serves from
// thread-local pages.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cqrsd::cli::main()
}
