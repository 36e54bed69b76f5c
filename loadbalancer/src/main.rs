//! The load balancer arrives with its own issue; this placeholder keeps the
//! workspace building.

fn main() {
    eprintln!("loadbalancer: not built yet");
    std::process::exit(1);
}
