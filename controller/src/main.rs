//! `halo-controller`: desired state, placement by memory, reconcile and
//! failover for halo's nodes. All of it lives in the library.

fn main() -> std::process::ExitCode {
    controller::cli::main()
}
