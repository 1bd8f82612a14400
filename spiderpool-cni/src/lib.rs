//! CNI protocol types and the agent client (filled by the CNI issue).
