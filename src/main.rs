fn main() -> std::process::ExitCode {
    vessel::cli::main()
}
