//! RabbitMQ: the connection and queue topology (`broker`), the field tables of message
//! properties (`table`), re-publishing a delivery into a delay queue or its dead-letter queue
//! (`reroute`), reading and replaying dead letters (`dead_letters`), and Celery's remote
//! control over the pidbox exchange: revoke, inspect and control, worker and requester side
//! (`pidbox`). Nothing here decides what a message means; `protocol` does.

pub mod broker;
pub mod dead_letters;
pub mod pidbox;
pub mod reroute;
pub mod table;
