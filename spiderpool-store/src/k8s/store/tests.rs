//! Unit tests of the block layout.

use super::*;

#[test]
fn blocks_are_aligned_and_named_as_dns_labels() {
    let (n, b) = block_of("10.6.168.65".parse().expect("ip"));
    assert_eq!(
        (n.as_str(), b.to_string().as_str()),
        ("v4-10-6-168-64", "10.6.168.64")
    );
    let (n, _) = block_of("10.6.168.63".parse().expect("ip"));
    assert_eq!(n, "v4-10-6-168-48");
    let (n, b) = block_of("fd00::1:ff".parse().expect("ip"));
    assert_eq!(n, "v6-fd0000000000000000000000000100f0");
    assert_eq!(b.to_string(), "fd00::1:f0");
}
