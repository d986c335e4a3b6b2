//! `haloctl`: the halo command line.

fn main() -> std::process::ExitCode {
    ctl::run(std::env::args_os())
}
