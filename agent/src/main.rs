//! `halo-agent`: the per-node daemon. Everything is in the library.

fn main() -> std::process::ExitCode {
    agent::cli::main()
}
