//! A real Kafka-compatible broker for tests: tansu with in-memory storage on a free port,
//! plus small producer/consumer helpers. Finds tansu in `$TANSU_BIN`, the CI cache
//! (`$HOME/.cache/scand/tansu/bin/tansu`, installed by .ci/run) or `PATH`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

/// A record to produce: key, value and headers.
pub type Record = (String, Vec<u8>, Vec<(&'static str, &'static str)>);

fn tansu_binary() -> PathBuf {
    if let Ok(path) = std::env::var("TANSU_BIN") {
        return PathBuf::from(path);
    }
    let cached = PathBuf::from(std::env::var("HOME").unwrap_or_default())
        .join(".cache/scand/tansu/bin/tansu");
    if cached.exists() {
        return cached;
    }
    PathBuf::from("tansu")
}

pub struct Broker {
    child: Child,
    pub bootstrap: String,
}

impl Broker {
    pub fn start() -> Broker {
        let port = super::free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let tansu = tansu_binary();
        let child = Command::new(&tansu)
            .args([
                "broker",
                "--storage-engine",
                "memory://tansu/",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| {
                panic!(
                    "this test needs the tansu Kafka broker, and {} did not start ({error}): \
                     set TANSU_BIN to a tansu binary, or run `bash .ci/run`, which installs \
                     one into ~/.cache/scand/tansu",
                    tansu.display()
                )
            });
        let broker = Broker {
            child,
            bootstrap: format!("127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(&broker.bootstrap).is_err() {
            assert!(
                Instant::now() < deadline,
                "tansu did not listen on {}",
                broker.bootstrap
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        broker
    }

    pub fn config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap);
        c
    }

    /// Creates the topics; one named `…changelog` is compacted, as scand requires.
    pub async fn create_topics(&self, topics: &[(&str, i32)]) {
        let admin: AdminClient<DefaultClientContext> =
            self.config().create().expect("admin client");
        let new: Vec<NewTopic<'_>> = topics
            .iter()
            .map(|(n, p)| {
                let topic = NewTopic::new(n, *p, TopicReplication::Fixed(1));
                if n.ends_with("changelog") {
                    topic.set("cleanup.policy", "compact")
                } else {
                    topic
                }
            })
            .collect();
        let results = admin
            .create_topics(&new, &AdminOptions::new())
            .await
            .expect("create topics");
        for r in results {
            r.expect("topic created");
        }
    }

    /// One record per produce batch: tansu 0.6 serves a fetch from the start of a stored
    /// batch only, so a consumer resuming at an offset inside a multi-record batch would wait
    /// forever (Apache Kafka returns the enclosing batch and the client skips ahead). Keyed
    /// records are partitioned as a Java producer does, the contract scand's topics rest on.
    pub fn producer(&self) -> FutureProducer {
        self.config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("batch.num.messages", "1")
            .set("partitioner", "murmur2_random")
            .create()
            .expect("producer")
    }

    /// Produces `(key, value, headers)` records in order, waiting for each delivery report.
    pub async fn produce(&self, topic: &str, records: &[Record]) {
        self.produce_to(topic, None, records).await;
    }

    /// [`Broker::produce`] onto one partition, whatever the keys say (`None`: by key).
    pub async fn produce_to(&self, topic: &str, partition: Option<i32>, records: &[Record]) {
        let producer = self.producer();
        let mut pending = Vec::new();
        for (key, value, headers) in records {
            let mut h = rdkafka::message::OwnedHeaders::new();
            for (k, v) in headers {
                h = h.insert(rdkafka::message::Header {
                    key: k,
                    value: Some(v.as_bytes()),
                });
            }
            let mut record = FutureRecord::to(topic)
                .key(key.as_bytes())
                .payload(value.as_slice())
                .headers(h);
            if let Some(partition) = partition {
                record = record.partition(partition);
            }
            pending.push(
                producer
                    .send_result(record)
                    .map_err(|(e, _)| e)
                    .expect("queued"),
            );
        }
        for p in pending {
            p.await.expect("delivery report").expect("delivered");
        }
    }

    /// Reads a topic from the start until `done` says so or `timeout` passes. `done` is asked
    /// only once the fetched records are drained: asked after each record, a predicate over
    /// all of them made long reads quadratic, and a 60 s read of ~10k records ended with
    /// thousands fetched but never looked at.
    pub fn consume_until(
        &self,
        topic: &str,
        timeout: Duration,
        done: impl Fn(&[OwnedMessage]) -> bool,
    ) -> Vec<OwnedMessage> {
        let consumer: BaseConsumer = self
            .config()
            .set("group.id", format!("test-reader-{}", std::process::id()))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .create()
            .expect("consumer");
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("metadata");
        let mut tpl = TopicPartitionList::new();
        for t in metadata.topics() {
            for p in t.partitions() {
                tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                    .expect("partition");
            }
        }
        consumer.assign(&tpl).expect("assign");
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => out.push(m.detach()),
                Some(Err(error)) => eprintln!("reading {topic}: {error}"),
                None if done(&out) => break,
                None => {}
            }
        }
        out
    }

    /// SIGSTOP: the broker stops answering, connections stay open.
    pub fn pause(&self) {
        signal(&self.child, "-STOP");
    }

    pub fn resume(&self) {
        signal(&self.child, "-CONT");
    }
}

fn signal(child: &Child, sig: &str) {
    Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("kill");
}

impl Drop for Broker {
    fn drop(&mut self) {
        signal(&self.child, "-CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn header(message: &OwnedMessage, key: &str) -> Option<String> {
    message.headers().and_then(|h| {
        h.iter()
            .find(|x| x.key == key)
            .and_then(|x| x.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    })
}

/// Groups status-topic records by key, in partition order.
pub fn by_key(messages: &[OwnedMessage]) -> HashMap<String, Vec<&OwnedMessage>> {
    let mut out: HashMap<String, Vec<&OwnedMessage>> = HashMap::new();
    for m in messages {
        let key = m
            .key()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .unwrap_or_default();
        out.entry(key).or_default().push(m);
    }
    out
}
