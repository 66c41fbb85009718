//! `falcon-infer serve`: Falcon behind the OpenAI and TGI HTTP APIs, many users at once.
//!
//! The parts, after TGI's router:
//! - [`validation`]: raw JSON → checked generation requests ([`params`]), before anything is
//!   queued; errors in each API's own shape ([`error`]).
//! - [`template`]: chat templates (minijinja, as transformers renders them) and the Falcon
//!   family defaults.
//! - [`http`]: the axum routes, streaming, authentication, limits, metrics ([`metrics`]); it
//!   knows nothing of batching.
//! - [`queue`]: the only link to the batching loop, which owns the model's context on its own
//!   thread: a bounded queue of [`queue::Job`]s, each with a bounded channel of
//!   [`queue::Event`]s back; [`text`] turns the loop's tokens into text.
//! - [`batch`]: the batching loop itself (continuous batching over one llama.cpp context).
//! - [`openai`], [`tgi`]: each API's request and response types.
//!
//! This module never prints: each request is reported as a `tracing` event (target
//! `falcon::serve::request`), which the binary prints.

pub mod batch;
pub mod error;
pub mod http;
pub mod metrics;
pub mod openai;
pub mod params;
pub mod queue;
pub mod template;
pub mod text;
pub mod tgi;
pub mod validation;

#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;
