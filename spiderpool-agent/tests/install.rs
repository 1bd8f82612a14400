//! The image carries every program the manifests run: each `/usr/local/bin/<program>` named in
//! deploy/kubernetes, and each CNI plugin the DaemonSet's init container copies to the node, is
//! built by the Dockerfile's `cargo build`, installed by it, copied into the final image, and is a
//! binary of this workspace.

use std::collections::BTreeSet;
use std::path::PathBuf;

fn repo(p: &str) -> PathBuf {
    [env!("CARGO_MANIFEST_DIR"), "..", p].iter().collect()
}

fn read(p: &str) -> String {
    std::fs::read_to_string(repo(p)).unwrap_or_else(|e| panic!("{p}: {e}"))
}

#[test]
fn the_dockerfile_builds_and_installs_every_program_the_manifests_run() {
    let mut programs = BTreeSet::new();
    for e in std::fs::read_dir(repo("deploy/kubernetes")).expect("deploy/kubernetes") {
        let path = e.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("read");
        for part in text.split("/usr/local/bin/").skip(1) {
            let name: String = part
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            if !name.is_empty() {
                programs.insert(name);
            }
        }
        // The init container's `for p in src:dst ...` list: the CNI plugins.
        for line in text
            .lines()
            .filter(|l| l.trim_start().starts_with("for p in "))
        {
            for pair in line.trim_start()["for p in ".len()..].split_whitespace() {
                if let Some((src, _)) = pair.trim_end_matches(';').split_once(':') {
                    programs.insert(src.to_string());
                }
            }
        }
    }
    for want in [
        "spiderpool-agent",
        "spiderctl",
        "spiderpool",
        "coordinator",
        "spiderpool-controller",
    ] {
        assert!(
            programs.contains(want),
            "{want} not found in deploy/kubernetes: {programs:?}"
        );
    }
    let dockerfile = read("Dockerfile");
    let build = dockerfile
        .lines()
        .find(|l| l.contains("cargo build"))
        .expect("a cargo build line");
    let install: String = dockerfile
        .lines()
        .skip_while(|l| !l.contains("cargo build"))
        .take_while(|l| !l.starts_with("FROM"))
        .collect();
    let copy = dockerfile
        .lines()
        .find(|l| l.starts_with("COPY --from=build"))
        .expect("the final image's COPY");
    let mut bins = String::new();
    for krate in [
        "spiderpool-agent",
        "spiderpool-cni",
        "spiderpool-controller",
    ] {
        bins.push_str(&read(&format!("{krate}/Cargo.toml")));
    }
    for p in &programs {
        assert!(
            install.contains(&format!("target/release/{p} "))
                || install.contains(&format!("target/release/{p}\n")),
            "the Dockerfile does not install {p}: {install}"
        );
        assert!(
            copy.contains(&format!("/usr/local/bin/{p} ")),
            "the final image lacks {p}: {copy}"
        );
        assert!(
            bins.contains(&format!("name = \"{p}\"")),
            "{p} is no binary of the workspace"
        );
        let krate = [
            "spiderpool-agent",
            "spiderpool-cni",
            "spiderpool-controller",
        ]
        .iter()
        .find(|k| read(&format!("{k}/Cargo.toml")).contains(&format!("name = \"{p}\"")))
        .expect("its crate");
        assert!(
            build.contains(&format!("-p {krate}")),
            "the Dockerfile does not build {krate}"
        );
    }
}
