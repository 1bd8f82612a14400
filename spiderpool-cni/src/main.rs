//! `spiderpool`: the CNI IPAM plugin binary. Everything is in [`spiderpool_cni::run`]; this
//! reads the environment and stdin, prints the answer on stdout and exits with its status.

fn main() {
    spiderpool_cni::answer::plugin_main("spiderpool", spiderpool_cni::run::run)
}
