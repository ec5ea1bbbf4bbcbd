//! Integration tests: the real server, real HTTP on loopback, a real log on disk.

mod amqp;
mod api;
mod cli;
mod console;
mod crash;
mod delivery;
mod durability;
mod edge;
mod health;
mod history;
mod kafka;
mod kafka_system;
mod layers;
mod observability;
mod openapi;
mod outcomes;
mod proxy;
mod quickstart;
mod receivers;
mod retries;
mod scenarios;
mod security;
mod subscription_changes;
mod support;
mod tenants;
mod tls;
