//! `spiderpool`: the CNI IPAM plugin binary. Everything is in [`spiderpool_cni::run`]; this
//! reads the environment and stdin, prints the answer on stdout and exits with its status.

use std::io::Read;

fn main() {
    // A CNI plugin takes no arguments; `--version` is for operators (runtimes use VERSION).
    if std::env::args().nth(1).as_deref() == Some("--version") {
        println!("spiderpool {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    let vars = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| k.starts_with("CNI_"))
        .collect();
    let mut stdin = Vec::new();
    let limit = spiderpool_cni::conf::MAX_STDIN as u64 + 1;
    let answer = match std::io::stdin().take(limit).read_to_end(&mut stdin) {
        Ok(_) => spiderpool_cni::run::run(&vars, &stdin),
        Err(e) => spiderpool_cni::run::Answer {
            stdout: spiderpool_cni::error::CniError::new(
                spiderpool_cni::error::IO_FAILURE,
                format!("cannot read the network configuration from stdin: {e}"),
            )
            .to_json(),
            status: spiderpool_cni::error::IO_FAILURE as i32,
        },
    };
    if !answer.stdout.is_empty() {
        println!("{}", answer.stdout);
    }
    std::process::exit(answer.status);
}
