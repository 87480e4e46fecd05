// The daemon allocates many small JSON values, records and index entries on
// every command and every projected event, across many threads: glibc's
// malloc was 15-20% of the daemon's CPU samples under load, and jemalloc
// caught up 1M events over 1M aggregates and opened fresh accounts 12-15%
// faster than mimalloc, at a similar peak RSS (BENCHMARKS.md, "Results this
// round").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    cqrsd::cli::main()
}
