//! The Confluent wire format: magic byte 0, a 4-byte big-endian schema id, then Avro binary.
//!
//! Decoding checks the frame before anything else (length, magic byte), then resolves the
//! writer schema by id through a [`SchemaResolver`], decodes with it, resolves the value to our
//! reader schema (Avro schema evolution) and finally to the Rust type. Each step has its own
//! error, naming where the record came from, so that the runtime can dead-letter it with a
//! precise reason, or retry when only the registry was unreachable. No input panics.

use std::collections::HashMap;
use std::fmt;
use std::io::Cursor;
use std::sync::{Arc, OnceLock, RwLock};

use apache_avro::Schema;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;

use crate::topics::{self, Contract};

/// The first byte of every Confluent-framed value.
pub const MAGIC_BYTE: u8 = 0;
/// Magic byte plus schema id.
pub const FRAME_HEADER_LEN: usize = 5;

/// Where a record came from, for error messages and DLQ headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
}

impl Location {
    /// A location.
    pub fn new(topic: impl Into<String>, partition: i32, offset: i64) -> Self {
        Self { topic: topic.into(), partition, offset }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]@{}", self.topic, self.partition, self.offset)
    }
}

/// Why a schema could not be resolved.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ResolveError {
    /// The registry has no schema with this id or subject.
    #[error("not found: {0}")]
    NotFound(String),
    /// The registry could not be reached or failed; worth retrying.
    #[error("registry unavailable: {0}")]
    Unavailable(String),
    /// The registry refused the schema (e.g. incompatible with the subject's history).
    #[error("refused by the registry: {0}")]
    Refused(String),
    /// The registry returned a schema we cannot parse.
    #[error("invalid schema: {0}")]
    Invalid(String),
}

/// Finds writer schemas by id and the ids of our schemas; the registry in production, a map in
/// unit tests.
#[async_trait::async_trait]
pub trait SchemaResolver: Send + Sync + fmt::Debug {
    /// The schema registered under `id`.
    async fn schema_by_id(&self, id: u32) -> Result<Arc<Schema>, ResolveError>;
    /// The id of `schema` (JSON text) under `subject`.
    async fn id_for(&self, subject: &str, schema: &str) -> Result<u32, ResolveError>;
}

/// Why a payload could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Shorter than the 5-byte frame header (an empty value is a tombstone, handled before).
    #[error("{at}: truncated payload of {len} byte(s); a Confluent-framed value has at least 5")]
    Truncated {
        /// Where.
        at: Location,
        /// Payload length.
        len: usize,
    },
    /// Not Confluent-framed Avro.
    #[error("{at}: wrong magic byte {found:#04x}, expected 0x00: not Confluent-framed Avro")]
    WrongMagicByte {
        /// Where.
        at: Location,
        /// The first byte.
        found: u8,
    },
    /// The registry does not know the schema id.
    #[error("{at}: unknown schema id {id}: {reason}")]
    UnknownSchemaId {
        /// Where.
        at: Location,
        /// The id in the frame.
        id: u32,
        /// What the registry said.
        reason: String,
    },
    /// The registry could not be asked; retrying can help.
    #[error("{at}: schema id {id} could not be resolved now: {reason}")]
    RegistryUnavailable {
        /// Where.
        at: Location,
        /// The id in the frame.
        id: u32,
        /// What failed.
        reason: String,
    },
    /// The bytes do not decode with their writer schema.
    #[error("{at}: payload is corrupt for writer schema {id}: {reason}")]
    Corrupt {
        /// Where.
        at: Location,
        /// The writer schema id.
        id: u32,
        /// What the decoder said.
        reason: String,
    },
    /// The writer schema cannot be read as our reader schema or type.
    #[error("{at}: writer schema {id} cannot be read as {reader}: {reason}")]
    Unresolvable {
        /// Where.
        at: Location,
        /// The writer schema id.
        id: u32,
        /// The reader's type.
        reader: String,
        /// Why not.
        reason: String,
    },
}

impl DecodeError {
    /// Whether retrying later can help (only when the registry was unreachable).
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::RegistryUnavailable { .. })
    }

    /// A bounded class for metrics and DLQ headers.
    pub fn class(&self) -> &'static str {
        match self {
            Self::Truncated { .. } => "decode.truncated",
            Self::WrongMagicByte { .. } => "decode.wrong_magic_byte",
            Self::UnknownSchemaId { .. } => "decode.unknown_schema_id",
            Self::RegistryUnavailable { .. } => "decode.registry_unavailable",
            Self::Corrupt { .. } => "decode.corrupt",
            Self::Unresolvable { .. } => "decode.unresolvable",
        }
    }
}

/// Why a value could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The value does not fit its own schema (a bug, or an out-of-range decimal).
    #[error("{topic}: value does not match its schema: {reason}")]
    Invalid {
        /// The topic.
        topic: String,
        /// Why not.
        reason: String,
    },
    /// The schema id could not be found.
    #[error("{topic}: cannot get the schema id: {source}")]
    Resolve {
        /// The topic.
        topic: String,
        /// The resolver's error.
        source: ResolveError,
    },
}

impl EncodeError {
    /// Whether retrying later can help.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Resolve { source: ResolveError::Unavailable(_), .. })
    }
}

/// The parsed reader schema of a contract topic; parsed once per process.
pub fn reader_schema(topic: &str) -> Option<&'static Schema> {
    static SCHEMAS: OnceLock<HashMap<&'static str, Schema>> = OnceLock::new();
    SCHEMAS
        .get_or_init(|| {
            topics::ALL
                .iter()
                .map(|spec| {
                    let schema = Schema::parse_str(spec.schema)
                        .unwrap_or_else(|e| panic!("schemas/{}.avsc does not parse: {e}", spec.name));
                    (spec.name, schema)
                })
                .collect()
        })
        .get(topic)
}

/// The full Avro name of a contract topic's value record, e.g. `io.tributary.usage.UsageEvent`:
/// the CloudEvents `type` of its records.
pub fn record_full_name(topic: &str) -> Option<&'static str> {
    static NAMES: OnceLock<HashMap<&'static str, String>> = OnceLock::new();
    NAMES
        .get_or_init(|| {
            topics::ALL
                .iter()
                .filter_map(|spec| {
                    let name = reader_schema(spec.name)?.name()?.fullname(None);
                    Some((spec.name, name))
                })
                .collect()
        })
        .get(topic)
        .map(String::as_str)
}

/// Splits a Confluent frame into schema id and Avro body, checking length and magic byte.
pub fn split_frame<'a>(at: &Location, payload: &'a [u8]) -> Result<(u32, &'a [u8]), DecodeError> {
    if payload.len() < FRAME_HEADER_LEN {
        return Err(DecodeError::Truncated { at: at.clone(), len: payload.len() });
    }
    if payload[0] != MAGIC_BYTE {
        return Err(DecodeError::WrongMagicByte { at: at.clone(), found: payload[0] });
    }
    let id = u32::from_be_bytes([payload[1], payload[2], payload[3], payload[4]]);
    Ok((id, &payload[FRAME_HEADER_LEN..]))
}

/// Encodes and decodes contract values in the Confluent wire format.
#[derive(Debug, Clone)]
pub struct Codec {
    resolver: Arc<dyn SchemaResolver>,
    ids: Arc<RwLock<HashMap<String, u32>>>,
    same_as_reader: Arc<RwLock<HashMap<(u32, &'static str), bool>>>,
    topic_prefix: String,
}

impl Codec {
    /// A codec resolving schemas through `resolver`.
    pub fn new(resolver: Arc<dyn SchemaResolver>) -> Self {
        Self { resolver, ids: Arc::default(), same_as_reader: Arc::default(), topic_prefix: String::new() }
    }

    /// The same codec for topics named `<prefix><topic>`: values are registered under the
    /// subjects of the prefixed names, as TopicNameStrategy wants.
    pub fn with_topic_prefix(mut self, prefix: &str) -> Self {
        self.topic_prefix = prefix.to_owned();
        self
    }

    /// The resolver.
    pub fn resolver(&self) -> &Arc<dyn SchemaResolver> {
        &self.resolver
    }

    /// Encodes `value` for its topic: frame header with the registered id of our schema, then
    /// the Avro body.
    pub async fn encode<T: Contract>(&self, value: &T) -> Result<Vec<u8>, EncodeError> {
        let spec = T::spec();
        let id = self.id_for(spec.name, spec.schema).await?;
        let body = cached_writer(spec.name)
            .write_ser_to_vec(value)
            .map_err(|e| EncodeError::Invalid { topic: spec.name.to_owned(), reason: e.to_string() })?;
        Ok(frame(id, &body))
    }

    /// Encodes a generic Avro `value` of `topic`'s contract (e.g. built from JSON by
    /// [`json_to_value`](crate::json::json_to_value)), after checking it fits the schema.
    pub async fn encode_value(&self, topic: &str, value: &apache_avro::types::Value) -> Result<Vec<u8>, EncodeError> {
        let invalid = |reason: String| EncodeError::Invalid { topic: topic.to_owned(), reason };
        let spec = topics::spec(topic).ok_or_else(|| invalid("not a Tributary topic".into()))?;
        let schema = reader_schema(topic).ok_or_else(|| invalid("no schema".into()))?;
        if !value.validate(schema) {
            return Err(invalid("the value does not fit the schema".into()));
        }
        let id = self.id_for(spec.name, spec.schema).await?;
        let mut body = Vec::new();
        cached_writer(spec.name).write_value_ref(&mut body, value).map_err(|e| invalid(e.to_string()))?;
        Ok(frame(id, &body))
    }

    async fn id_for(&self, topic: &str, schema: &str) -> Result<u32, EncodeError> {
        if let Some(id) = self.ids.read().expect("id cache lock").get(topic) {
            return Ok(*id);
        }
        let id = self
            .resolver
            .id_for(&topics::value_subject(&format!("{}{topic}", self.topic_prefix)), schema)
            .await
            .map_err(|source| EncodeError::Resolve { topic: topic.to_owned(), source })?;
        self.ids.write().expect("id cache lock").insert(topic.to_owned(), id);
        Ok(id)
    }

    /// Decodes a value of `T` read at `at`.
    pub async fn decode<T: Contract>(&self, at: &Location, payload: &[u8]) -> Result<T, DecodeError> {
        let reader = reader_schema(T::TOPIC).expect("a Contract topic has a schema");
        let (id, body) = split_frame(at, payload)?;
        let unresolvable = |reason: String| DecodeError::Unresolvable {
            at: at.clone(),
            id,
            reader: std::any::type_name::<T>().rsplit("::").next().unwrap_or_default().to_owned(),
            reason,
        };
        // Fast path, the common case: written with our own schema. Straight from bytes to the
        // Rust type, without an intermediate value and its schema resolution.
        if self.writes_as_reader(at, id, T::TOPIC).await? {
            let mut cursor = Cursor::new(body);
            let value: T = cached_reader(T::TOPIC).read_deser(&mut cursor).map_err(|e| DecodeError::Corrupt {
                at: at.clone(),
                id,
                reason: e.to_string(),
            })?;
            check_consumed(at, id, body, &cursor)?;
            return Ok(value);
        }
        let (_, value, _) = self.decode_value(at, payload).await?;
        let value = value.resolve(reader).map_err(|e| unresolvable(e.to_string()))?;
        apache_avro::from_value::<T>(&value).map_err(|e| unresolvable(e.to_string()))
    }

    /// Whether schema `id` is our reader schema of `topic` (same canonical form); asked of the
    /// resolver once per id.
    async fn writes_as_reader(&self, at: &Location, id: u32, topic: &'static str) -> Result<bool, DecodeError> {
        if let Some(same) = self.same_as_reader.read().expect("schema cache lock").get(&(id, topic)) {
            return Ok(*same);
        }
        let writer = self.writer_schema(at, id).await?;
        let reader = reader_schema(topic).expect("a Contract topic has a schema");
        let same = writer.canonical_form() == reader.canonical_form();
        self.same_as_reader.write().expect("schema cache lock").insert((id, topic), same);
        Ok(same)
    }

    async fn writer_schema(&self, at: &Location, id: u32) -> Result<Arc<Schema>, DecodeError> {
        self.resolver.schema_by_id(id).await.map_err(|e| match e {
            ResolveError::Unavailable(reason) => DecodeError::RegistryUnavailable { at: at.clone(), id, reason },
            other => DecodeError::UnknownSchemaId { at: at.clone(), id, reason: other.to_string() },
        })
    }

    /// Decodes any Confluent-framed value with its writer schema, for tools that print what
    /// they read (`tributary tap`): returns the schema id, the value and the writer schema.
    pub async fn decode_value(&self, at: &Location, payload: &[u8]) -> Result<(u32, Value, Arc<Schema>), DecodeError> {
        let (id, body) = split_frame(at, payload)?;
        let writer = self.writer_schema(at, id).await?;
        let mut cursor = Cursor::new(body);
        let value = GenericDatumReader::builder(&writer)
            .build()
            .and_then(|reader| reader.read_value(&mut cursor))
            .map_err(|e| DecodeError::Corrupt { at: at.clone(), id, reason: e.to_string() })?;
        check_consumed(at, id, body, &cursor)?;
        Ok((id, value, writer))
    }
}

/// A contract value as JSON, in the shape `tributary tap` prints its values (decimals as exact
/// strings, times in RFC 3339), through its topic's own schema; for bodies sent outside Kafka
/// (webhooks).
pub fn contract_to_json<T: Contract>(value: &T) -> Result<serde_json::Value, EncodeError> {
    let invalid = |reason: String| EncodeError::Invalid { topic: T::TOPIC.to_owned(), reason };
    let body = cached_writer(T::TOPIC).write_ser_to_vec(value).map_err(|e| invalid(e.to_string()))?;
    let value = cached_reader(T::TOPIC).read_value(&mut Cursor::new(&body[..])).map_err(|e| invalid(e.to_string()))?;
    let schema = reader_schema(T::TOPIC).expect("a Contract topic has a schema");
    Ok(crate::json::value_to_json(&value, schema))
}

/// `body` in the Confluent framing: magic byte, schema id, Avro body.
fn frame(id: u32, body: &[u8]) -> Vec<u8> {
    let mut framed = Vec::with_capacity(FRAME_HEADER_LEN + body.len());
    framed.push(MAGIC_BYTE);
    framed.extend_from_slice(&id.to_be_bytes());
    framed.extend_from_slice(body);
    framed
}

/// Refuses bytes left over after the value: a frame holds exactly one datum.
fn check_consumed(at: &Location, id: u32, body: &[u8], cursor: &Cursor<&[u8]>) -> Result<(), DecodeError> {
    let trailing = body.len() as u64 - cursor.position();
    if trailing > 0 {
        return Err(DecodeError::Corrupt {
            at: at.clone(),
            id,
            reason: format!("{trailing} byte(s) left after the value"),
        });
    }
    Ok(())
}

/// A datum reader of a contract topic's own schema, built once per process.
fn cached_reader(topic: &str) -> &'static GenericDatumReader<'static> {
    static READERS: OnceLock<HashMap<&'static str, GenericDatumReader<'static>>> = OnceLock::new();
    READERS
        .get_or_init(|| {
            topics::ALL
                .iter()
                .map(|spec| {
                    let schema = reader_schema(spec.name).expect("every topic has a schema");
                    let reader = GenericDatumReader::builder(schema).build().expect("our schemas resolve");
                    (spec.name, reader)
                })
                .collect()
        })
        .get(topic)
        .expect("a contract topic")
}

/// A datum writer of a contract topic's own schema, built once per process.
fn cached_writer(topic: &str) -> &'static GenericDatumWriter<'static> {
    static WRITERS: OnceLock<HashMap<&'static str, GenericDatumWriter<'static>>> = OnceLock::new();
    WRITERS
        .get_or_init(|| {
            topics::ALL
                .iter()
                .map(|spec| {
                    let schema = reader_schema(spec.name).expect("every topic has a schema");
                    let writer = GenericDatumWriter::builder(schema).build().expect("our schemas resolve");
                    (spec.name, writer)
                })
                .collect()
        })
        .get(topic)
        .expect("a contract topic")
}

/// A resolver over a fixed map of schemas, for unit tests and offline tools: ids are assigned
/// in registration order from 1.
#[derive(Debug, Default)]
pub struct InMemoryResolver {
    schemas: RwLock<Vec<(String, Arc<Schema>, String)>>,
}

impl InMemoryResolver {
    /// An empty resolver.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `schema` under `subject`, returning its id (the same id for the same text).
    pub fn register(&self, subject: &str, schema: &str) -> Result<u32, ResolveError> {
        let mut schemas = self.schemas.write().expect("resolver lock");
        if let Some(index) = schemas.iter().position(|(s, _, text)| s == subject && text == schema) {
            return Ok(index as u32 + 1);
        }
        let parsed = Schema::parse_str(schema).map_err(|e| ResolveError::Invalid(e.to_string()))?;
        schemas.push((subject.to_owned(), Arc::new(parsed), schema.to_owned()));
        Ok(schemas.len() as u32)
    }
}

#[async_trait::async_trait]
impl SchemaResolver for InMemoryResolver {
    async fn schema_by_id(&self, id: u32) -> Result<Arc<Schema>, ResolveError> {
        let schemas = self.schemas.read().expect("resolver lock");
        (id as usize)
            .checked_sub(1)
            .and_then(|index| schemas.get(index))
            .map(|(_, schema, _)| schema.clone())
            .ok_or_else(|| ResolveError::NotFound(format!("schema id {id}")))
    }

    async fn id_for(&self, subject: &str, schema: &str) -> Result<u32, ResolveError> {
        self.register(subject, schema)
    }
}
