//! The schema resolver backed by a Confluent-compatible registry, and schema governance.
//!
//! Registry calls go through `schema_registry_converter`; only the compatibility-level endpoint,
//! which that crate does not cover, is called directly.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use apache_avro::Schema;
use schema_registry_converter::async_impl::schema_registry::{SrSettings, get_schema_by_id, post_schema};
use schema_registry_converter::error::SRCError;
use schema_registry_converter::schema_registry_common::{SchemaType, SuppliedSchema};

use crate::codec::{ResolveError, SchemaResolver};
use crate::topics::TopicSpec;

/// The compatibility level of every shared subject (DESIGN.md, "Contracts").
pub const COMPATIBILITY: &str = "FULL_TRANSITIVE";

/// Where the registry is and how to authenticate.
#[derive(Clone)]
pub struct RegistryClient {
    url: String,
    settings: SrSettings,
    basic_auth: Option<(String, Option<String>)>,
    http: reqwest::Client,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient").field("url", &self.url).finish_non_exhaustive()
    }
}

impl RegistryClient {
    /// A client of the registry at `url` (the base of its Confluent-compatible API).
    pub fn new(url: &str, username: Option<&str>, password: Option<&str>) -> Result<Self, ResolveError> {
        let url = url.trim_end_matches('/').to_owned();
        let mut builder = SrSettings::new_builder(url.clone());
        if let Some(user) = username {
            builder.set_basic_authorization(user, password);
        }
        let settings = builder.build().map_err(|e| ResolveError::Invalid(e.to_string()))?;
        Ok(Self {
            url,
            settings,
            basic_auth: username.map(|u| (u.to_owned(), password.map(str::to_owned))),
            http: reqwest::Client::new(),
        })
    }

    /// The settings `schema_registry_converter` uses.
    pub fn settings(&self) -> &SrSettings {
        &self.settings
    }

    /// Registers `spec`'s schema under its value subject (or finds the id it already has).
    pub async fn register(&self, spec: &TopicSpec) -> Result<u32, ResolveError> {
        register_schema(&self.settings, &spec.subject(), spec.schema).await
    }

    /// Sets the compatibility level of `subject`.
    pub async fn set_compatibility(&self, subject: &str, level: &str) -> Result<(), ResolveError> {
        let request = self
            .http
            .put(format!("{}/config/{subject}", self.url))
            .header("Content-Type", "application/vnd.schemaregistry.v1+json")
            .json(&serde_json::json!({ "compatibility": level }));
        let response = self.authorized(request).send().await.map_err(|e| ResolveError::Unavailable(e.to_string()))?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            let body = response.text().await.unwrap_or_default();
            Err(ResolveError::Refused(format!("PUT /config/{subject}: {status}: {body}")))
        }
    }

    /// The compatibility level set on `subject` itself, if any.
    pub async fn compatibility(&self, subject: &str) -> Result<Option<String>, ResolveError> {
        let request = self.http.get(format!("{}/config/{subject}", self.url));
        let response = self.authorized(request).send().await.map_err(|e| ResolveError::Unavailable(e.to_string()))?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let body: serde_json::Value = response.json().await.map_err(|e| ResolveError::Invalid(e.to_string()))?;
        Ok(body
            .get("compatibilityLevel")
            .or_else(|| body.get("compatibility"))
            .and_then(|v| v.as_str())
            .map(str::to_owned))
    }

    fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.basic_auth {
            Some((user, password)) => request.basic_auth(user, password.as_deref()),
            None => request,
        }
    }
}

async fn register_schema(settings: &SrSettings, subject: &str, schema: &str) -> Result<u32, ResolveError> {
    let supplied = SuppliedSchema::new(None, SchemaType::Avro, schema.to_owned());
    post_schema(settings, subject.to_owned(), supplied).await.map(|registered| registered.id).map_err(classify)
}

fn classify(error: SRCError) -> ResolveError {
    let text = match &error.cause {
        Some(cause) => format!("{}: {cause}", error.error),
        None => error.error.clone(),
    };
    if error.retriable {
        ResolveError::Unavailable(text)
    } else if text.contains("404") || text.to_ascii_lowercase().contains("not found") {
        ResolveError::NotFound(text)
    } else {
        ResolveError::Refused(text)
    }
}

/// A [`SchemaResolver`] over the registry, caching every schema and id it has seen (both are
/// immutable in a registry, so the caches never go stale).
#[derive(Debug, Clone)]
pub struct RegistryResolver {
    client: RegistryClient,
    by_id: Arc<RwLock<HashMap<u32, Arc<Schema>>>>,
}

impl RegistryResolver {
    /// A resolver using `client`.
    pub fn new(client: RegistryClient) -> Self {
        Self { client, by_id: Arc::default() }
    }
}

#[async_trait::async_trait]
impl SchemaResolver for RegistryResolver {
    async fn schema_by_id(&self, id: u32) -> Result<Arc<Schema>, ResolveError> {
        if let Some(schema) = self.by_id.read().expect("schema cache lock").get(&id) {
            return Ok(schema.clone());
        }
        let registered = get_schema_by_id(id, self.client.settings()).await.map_err(classify)?;
        if registered.schema_type != SchemaType::Avro {
            return Err(ResolveError::Invalid(format!("schema {id} is {:?}, not Avro", registered.schema_type)));
        }
        let schema = Arc::new(Schema::parse_str(&registered.schema).map_err(|e| ResolveError::Invalid(e.to_string()))?);
        self.by_id.write().expect("schema cache lock").insert(id, schema.clone());
        Ok(schema)
    }

    async fn id_for(&self, subject: &str, schema: &str) -> Result<u32, ResolveError> {
        register_schema(self.client.settings(), subject, schema).await
    }
}
