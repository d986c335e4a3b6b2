//! `haloctl` as a bin of the tests package, so integration tests can run the
//! real command line through `env!("CARGO_BIN_EXE_haloctl-shim")`.

fn main() -> std::process::ExitCode {
    ctl::run(std::env::args_os())
}
