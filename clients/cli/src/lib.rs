//! `gateway`, the command-line client of the gateway's public API. The library holds
//! everything but argument parsing's entry point, so each part is tested on its own: the API
//! client ([`api`]), `--param` parsing ([`params`]), the photo's format and route ([`photo`]),
//! text rendering ([`render`]), and the subcommands over them ([`commands`]).

pub mod api;
pub mod cli;
pub mod commands;
pub mod failure;
pub mod output;
pub mod params;
pub mod photo;
pub mod progress;
pub mod render;
