//! Project tasks (`cargo xtask ...`).

fn main() {
    eprintln!("xtask: no tasks yet");
}
