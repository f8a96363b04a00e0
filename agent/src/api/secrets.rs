//! `berth.v1.Secrets`: create, list and delete image pull secrets. Material goes in, never out.

use std::sync::Arc;

use secrecy::SecretString;
use tonic::{Request, Response, Status};
use tracing::{info, instrument};

use super::access::Access;
use super::convert;
use super::pb::{self, create_secret_request::Credential as PbCredential};
use super::status::{order_status, secret_status, ApiError};
use berth_core::order::parse_project;
use berth_secrets::{Credential, NewSecret, SecretId, SecretKind, SecretStore};

#[derive(Debug)]
pub(crate) struct SecretsService {
    store: Arc<SecretStore>,
    access: Access,
}

impl SecretsService {
    pub(crate) fn new(store: Arc<SecretStore>, access: Access) -> Self {
        Self { store, access }
    }
}

#[tonic::async_trait]
impl pb::secrets_server::Secrets for SecretsService {
    #[instrument(skip_all, fields(project = %request.get_ref().project, name = %request.get_ref().name))]
    async fn create_secret(
        &self,
        request: Request<pb::CreateSecretRequest>,
    ) -> Result<Response<pb::Secret>, Status> {
        let project = parse_project(&request.get_ref().project).map_err(order_status)?;
        self.access.check(&request, &project)?;
        let request = request.into_inner();
        let (kind, server, credential) = match request.credential {
            Some(PbCredential::Docker(c)) => (
                SecretKind::Docker,
                c.server,
                password(c.username, c.password),
            ),
            Some(PbCredential::Acr(c)) => {
                (SecretKind::Acr, c.server, password(c.username, c.password))
            }
            Some(PbCredential::Gar(c)) => (
                SecretKind::Gar,
                c.server,
                Credential::JsonKey(SecretString::from(c.json_key)),
            ),
            None => {
                return Err(ApiError::Missing {
                    field: "credential (docker, acr or gar)",
                }
                .into())
            }
        };
        let meta = self
            .store
            .create(NewSecret {
                project,
                name: request.name,
                kind,
                server,
                credential,
            })
            .await
            .map_err(secret_status)?;
        info!(id = %meta.id, kind = %meta.kind, server = %meta.server, "secret created");
        Ok(Response::new(convert::secret(meta)))
    }

    async fn list_secrets(
        &self,
        request: Request<pb::ListSecretsRequest>,
    ) -> Result<Response<pb::ListSecretsResponse>, Status> {
        let project = parse_project(&request.get_ref().project).map_err(order_status)?;
        self.access.check(&request, &project)?;
        let secrets = self.store.list(&project).await.map_err(secret_status)?;
        Ok(Response::new(pb::ListSecretsResponse {
            secrets: secrets.into_iter().map(convert::secret).collect(),
        }))
    }

    #[instrument(skip_all, fields(project = %request.get_ref().project, id = %request.get_ref().id))]
    async fn delete_secret(
        &self,
        request: Request<pb::DeleteSecretRequest>,
    ) -> Result<Response<pb::DeleteSecretResponse>, Status> {
        let project = parse_project(&request.get_ref().project).map_err(order_status)?;
        self.access.check(&request, &project)?;
        let id = SecretId::parse(&request.get_ref().id).map_err(secret_status)?;
        self.store
            .delete(&project, &id)
            .await
            .map_err(secret_status)?;
        info!("secret deleted");
        Ok(Response::new(pb::DeleteSecretResponse {}))
    }
}

fn password(username: String, password: String) -> Credential {
    Credential::UsernamePassword {
        username,
        password: SecretString::from(password),
    }
}
