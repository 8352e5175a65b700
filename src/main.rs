fn main() -> std::process::ExitCode {
    vessel::cli::main()
}

/// mimalloc: measurably cheaper than glibc's allocator for the proxy's many small, short-lived
/// allocations (see `benches/reconcile.rs`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
