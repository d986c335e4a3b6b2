//! `halo-controller` as a bin of the tests package, so integration tests
//! can start the real daemon through `env!("CARGO_BIN_EXE_halo-controller-shim")`.

fn main() -> std::process::ExitCode {
    controller::cli::main()
}
