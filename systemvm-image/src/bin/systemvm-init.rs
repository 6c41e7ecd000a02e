//! `systemvm-init`: process 1 of a system VM (see `systemvm_image::init`).
#![forbid(unsafe_code)]

fn main() {
    systemvm_image::init::main()
}
