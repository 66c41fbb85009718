//! falcon
