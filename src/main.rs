fn main() -> std::process::ExitCode {
    cqrsd::cli::main()
}
