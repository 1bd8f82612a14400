//! LeaseStore backends (filled by the store issue).
