//! The OpenBao API client: the transport plus berth's session (its token).
//!
//! A 403 on a call with berth's token is either a token OpenBao no longer accepts (expired,
//! revoked, OpenBao restarted) or a path the agent's policy forbids: `lookup-self` tells them
//! apart, and a refused token is replaced once.

use std::sync::Arc;

use bytes::Bytes;
use reqwest::{Method, StatusCode};
use secrecy::SecretString;
use tracing::{debug, instrument};

use super::session::{self, Session};
use super::transport::{Answer, Transport};
use super::OpenbaoSettings;
use crate::SecretError;

/// The OpenBao API client: HTTP plus berth's session (its token).
pub(super) struct Client {
    transport: Transport,
    session: Session,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("address", &self.transport.address())
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

impl Client {
    pub(super) fn new(settings: &OpenbaoSettings) -> Result<Client, SecretError> {
        Ok(Client {
            transport: Transport::new(settings)?,
            session: Session::new(settings.login.clone()),
        })
    }

    pub(super) fn address(&self) -> &str {
        self.transport.address()
    }

    pub(super) fn session(&self) -> &Session {
        &self.session
    }

    pub(super) fn transport(&self) -> &Transport {
        &self.transport
    }

    /// One call with berth's token (logging in first when there is none or it expired). A 403
    /// is [`SecretError::Denied`] when the token is still good; a token OpenBao refuses is
    /// replaced once and the call repeated.
    #[instrument(skip_all, fields(method = %method, path))]
    pub(super) async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<Answer, SecretError> {
        let lease = self.session.token(&self.transport).await?;
        let answer = self
            .transport
            .send(method.clone(), path, Some(lease.token()), body.clone())
            .await?;
        if answer.status != StatusCode::FORBIDDEN {
            return Ok(answer);
        }
        if self.token_is_accepted(lease.token()).await? {
            return Err(self.denied(path));
        }
        debug!("openbao refused berth's token; replacing it");
        let lease = self
            .session
            .replace(&self.transport, Some(lease.id()))
            .await?;
        let answer = self
            .transport
            .send(method, path, Some(lease.token()), body)
            .await?;
        if answer.status == StatusCode::FORBIDDEN {
            return Err(self.denied(path));
        }
        Ok(answer)
    }

    /// `GET auth/token/lookup-self`: whether OpenBao still accepts `token`.
    async fn token_is_accepted(&self, token: &SecretString) -> Result<bool, SecretError> {
        let answer = self
            .transport
            .send(Method::GET, "auth/token/lookup-self", Some(token), None)
            .await?;
        Ok(answer.status.is_success())
    }

    fn denied(&self, path: &str) -> SecretError {
        SecretError::Denied {
            address: self.transport.address().to_owned(),
            path: path.to_owned(),
        }
    }
}

/// Keeps berth's token valid for as long as the store lives (the store aborts it on drop).
pub(super) async fn keep_token_fresh(client: Arc<Client>) {
    session::keep_token_fresh(client.session(), client.transport()).await;
}
