//! Shared helpers for the integration tests.

#![allow(dead_code)]

pub mod binary;
pub mod gateway;
pub mod http;
pub mod powercut;
