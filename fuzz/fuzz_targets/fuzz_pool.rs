//! Decoding and validating pools from arbitrary YAML/JSON must never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use spiderpool_core::manifest;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(docs) = manifest::parse_documents(s) {
        let objects: Vec<_> = docs.into_iter().filter_map(|d| d.object.ok()).collect();
        if let Ok(set) = spiderpool_core::PoolSet::build(&objects) {
            let _ = set.warnings();
            let _ = set.default_families();
        }
    }
});
