//! `vmq-cni`: the CNI plugin (see the `vmq-cni` crate). Built with vmq so that one package ships
//! both and the end-to-end tests run the two binaries together.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    vmq_cni::main()
}
