//! SCRAM-SHA-256 and SCRAM-SHA-512 (RFC 5802, RFC 7677): the key derivation and the
//! messages both sides of an exchange build and check. Channel binding is not used
//! (`n,,` / `c=biws`), as in Kafka.
//!
//! **Invariant:** only salted, iterated keys are stored (`StoredKey`, `ServerKey`); a
//! password never leaves the process that read it.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::{digest, hmac, pbkdf2, rand::SecureRandom as _};

/// Fewest PBKDF2 iterations accepted (RFC 7677's minimum, Kafka's default).
pub const ITERATIONS_MIN: u32 = 4096;
/// Most iterations accepted: more would let a credential stall every authentication.
pub const ITERATIONS_MAX: u32 = 1_000_000;
/// The GS2 header without channel binding, base64 (`n,,`).
const CHANNEL_BINDING: &str = "biws";

/// The hash a SCRAM exchange uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mechanism {
    Sha256,
    Sha512,
}

impl Mechanism {
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Sha256 => "SCRAM-SHA-256",
            Mechanism::Sha512 => "SCRAM-SHA-512",
        }
    }

    /// Parses `SCRAM-SHA-256` / `SCRAM-SHA-512` (or `sha-256`, `sha512`, any case).
    pub fn parse(text: &str) -> Option<Self> {
        let t = text.to_ascii_uppercase().replace(['-', '_'], "");
        match t.trim_start_matches("SCRAM").trim_start_matches("SHA") {
            "256" => Some(Mechanism::Sha256),
            "512" => Some(Mechanism::Sha512),
            _ => None,
        }
    }

    fn pbkdf2(self) -> pbkdf2::Algorithm {
        match self {
            Mechanism::Sha256 => pbkdf2::PBKDF2_HMAC_SHA256,
            Mechanism::Sha512 => pbkdf2::PBKDF2_HMAC_SHA512,
        }
    }

    fn hmac(self) -> hmac::Algorithm {
        match self {
            Mechanism::Sha256 => hmac::HMAC_SHA256,
            Mechanism::Sha512 => hmac::HMAC_SHA512,
        }
    }

    fn digest(self) -> &'static digest::Algorithm {
        match self {
            Mechanism::Sha256 => &digest::SHA256,
            Mechanism::Sha512 => &digest::SHA512,
        }
    }

    fn len(self) -> usize {
        self.digest().output_len()
    }

    pub fn hmac_sign(self, key: &[u8], data: &[u8]) -> Vec<u8> {
        hmac::sign(&hmac::Key::new(self.hmac(), key), data)
            .as_ref()
            .to_vec()
    }
}

/// What a broker stores of a user's password, for one mechanism.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    pub mechanism: Mechanism,
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: Vec<u8>,
    pub server_key: Vec<u8>,
}

fn salted_password(mechanism: Mechanism, password: &str, salt: &[u8], iterations: u32) -> Vec<u8> {
    let mut out = vec![0u8; mechanism.len()];
    let iterations =
        std::num::NonZeroU32::new(iterations.max(1)).unwrap_or(std::num::NonZeroU32::MIN);
    pbkdf2::derive(
        mechanism.pbkdf2(),
        iterations,
        salt,
        password.as_bytes(),
        &mut out,
    );
    out
}

/// Compares secrets in a time that depends on their length only.
pub fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Random bytes from the system's generator.
pub fn random_bytes(len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    // The system generator fails only where the OS has none at all.
    if ring::rand::SystemRandom::new().fill(&mut out).is_err() {
        panic!("the operating system's random number generator failed");
    }
    out
}

fn nonce() -> String {
    BASE64.encode(random_bytes(18))
}

impl Credential {
    /// Derives the stored credential from a password, with a new random salt.
    pub fn derive(mechanism: Mechanism, password: &str, iterations: u32) -> Self {
        let salt = random_bytes(16);
        let salted = salted_password(mechanism, password, &salt, iterations);
        let client_key = mechanism.hmac_sign(&salted, b"Client Key");
        Credential {
            mechanism,
            iterations,
            stored_key: digest::digest(mechanism.digest(), &client_key)
                .as_ref()
                .to_vec(),
            server_key: mechanism.hmac_sign(&salted, b"Server Key"),
            salt,
        }
    }
}

/// A SCRAM message that does not follow the RFC, with what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ScramError(pub String);

fn bad(text: impl Into<String>) -> ScramError {
    ScramError(text.into())
}

/// The `key=value` attributes of a SCRAM message.
fn attribute<'a>(message: &'a str, key: char) -> Option<&'a str> {
    message.split(',').find_map(|part| {
        let mut chars = part.chars();
        (chars.next() == Some(key) && chars.next() == Some('=')).then(|| &part[2..])
    })
}

/// A user name fit for SCRAM without escaping, and for principals: letters, digits,
/// `.`, `_`, `-`, `@`; 1 to 128 characters.
///
/// # Errors
/// The rule broken.
pub fn validate_user_name(name: &str) -> Result<(), ScramError> {
    if name.is_empty() || name.len() > 128 {
        return Err(bad("a user name has 1 to 128 characters"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@')))
    {
        return Err(bad(format!(
            "character {c:?} is not allowed in a user name; use letters, digits, '.', '_', '-' and '@'"
        )));
    }
    Ok(())
}

/// The client's side of one exchange.
pub struct ClientExchange {
    mechanism: Mechanism,
    password: String,
    first_bare: String,
    nonce: String,
    server_signature: Vec<u8>,
}

impl ClientExchange {
    pub fn new(mechanism: Mechanism, user: &str, password: &str) -> Self {
        let nonce = nonce();
        ClientExchange {
            mechanism,
            password: password.to_string(),
            first_bare: format!("n={user},r={nonce}"),
            nonce,
            server_signature: Vec::new(),
        }
    }

    /// The client-first message.
    pub fn first(&self) -> String {
        format!("n,,{}", self.first_bare)
    }

    /// The client-final message answering `server_first`.
    ///
    /// # Errors
    /// A server-first message that does not follow the RFC, or whose nonce does not
    /// extend ours.
    pub fn finish(&mut self, server_first: &str) -> Result<String, ScramError> {
        let nonce = attribute(server_first, 'r').ok_or_else(|| bad("server-first lacks r="))?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(bad("the server's nonce does not extend the client's"));
        }
        let salt = attribute(server_first, 's')
            .and_then(|s| BASE64.decode(s).ok())
            .ok_or_else(|| bad("server-first lacks a base64 salt s="))?;
        let iterations: u32 = attribute(server_first, 'i')
            .and_then(|i| i.parse().ok())
            .ok_or_else(|| bad("server-first lacks an iteration count i="))?;
        if !(ITERATIONS_MIN..=ITERATIONS_MAX).contains(&iterations) {
            return Err(bad(format!("the server asks for {iterations} iterations")));
        }
        let m = self.mechanism;
        let salted = salted_password(m, &self.password, &salt, iterations);
        let client_key = m.hmac_sign(&salted, b"Client Key");
        let stored_key = digest::digest(m.digest(), &client_key);
        let without_proof = format!("c={CHANNEL_BINDING},r={nonce}");
        let auth_message = format!("{},{server_first},{without_proof}", self.first_bare);
        let signature = m.hmac_sign(stored_key.as_ref(), auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(&signature)
            .map(|(a, b)| a ^ b)
            .collect();
        let server_key = m.hmac_sign(&salted, b"Server Key");
        self.server_signature = m.hmac_sign(&server_key, auth_message.as_bytes());
        Ok(format!("{without_proof},p={}", BASE64.encode(proof)))
    }

    /// Checks the server-final message: the server knew the credential.
    ///
    /// # Errors
    /// An error from the server, or a signature that does not match.
    pub fn verify(&self, server_final: &str) -> Result<(), ScramError> {
        if let Some(error) = attribute(server_final, 'e') {
            return Err(bad(format!("the server refused: {error}")));
        }
        let signature = attribute(server_final, 'v')
            .and_then(|v| BASE64.decode(v).ok())
            .ok_or_else(|| bad("server-final lacks v="))?;
        if !same(&signature, &self.server_signature) {
            return Err(bad(
                "the server's signature does not match: it does not know this user's credential",
            ));
        }
        Ok(())
    }
}

/// The server's side of one exchange, between the first and the final message.
#[derive(Debug, Clone)]
pub struct ServerExchange {
    pub user: String,
    nonce: String,
    first_bare: String,
    server_first: String,
}

impl ServerExchange {
    /// Reads the client-first message. [`ServerExchange::server_first`] answers it, with
    /// the user's salt and iterations (made-up ones for an unknown user, so that the
    /// answer does not tell whether the user exists).
    ///
    /// # Errors
    /// A message that does not follow the RFC.
    pub fn start(client_first: &str) -> Result<Self, ScramError> {
        let bare = client_first.strip_prefix("n,,").ok_or_else(|| {
            bad("client-first must start with \"n,,\" (no channel binding, no authzid)")
        })?;
        let user = attribute(bare, 'n').ok_or_else(|| bad("client-first lacks n=USER"))?;
        validate_user_name(user)?;
        let client_nonce = attribute(bare, 'r').ok_or_else(|| bad("client-first lacks r=NONCE"))?;
        if client_nonce.is_empty() {
            return Err(bad("client-first has an empty nonce"));
        }
        Ok(ServerExchange {
            user: user.to_string(),
            nonce: format!("{client_nonce}{}", nonce()),
            first_bare: bare.to_string(),
            server_first: String::new(),
        })
    }

    /// The server-first message for the user's (or a made-up) salt and iterations.
    pub fn server_first(&mut self, salt: &[u8], iterations: u32) -> String {
        self.server_first = format!("r={},s={},i={iterations}", self.nonce, BASE64.encode(salt));
        self.server_first.clone()
    }

    /// Checks the client-final message against the stored credential; answers the
    /// server-final message.
    ///
    /// # Errors
    /// A malformed message, a nonce that is not this exchange's, or a wrong proof.
    pub fn finish(
        &self,
        client_final: &str,
        credential: &Credential,
    ) -> Result<String, ScramError> {
        let m = credential.mechanism;
        if attribute(client_final, 'c') != Some(CHANNEL_BINDING) {
            return Err(bad("client-final must carry c=biws (no channel binding)"));
        }
        if attribute(client_final, 'r') != Some(self.nonce.as_str()) {
            return Err(bad("client-final carries another exchange's nonce"));
        }
        let (without_proof, proof) = client_final
            .rsplit_once(",p=")
            .ok_or_else(|| bad("client-final lacks p=PROOF"))?;
        let proof = BASE64
            .decode(proof)
            .map_err(|_| bad("the proof is not base64"))?;
        let auth_message = format!("{},{},{without_proof}", self.first_bare, self.server_first);
        let signature = m.hmac_sign(&credential.stored_key, auth_message.as_bytes());
        if proof.len() != signature.len() {
            return Err(bad("wrong password"));
        }
        let client_key: Vec<u8> = proof.iter().zip(&signature).map(|(a, b)| a ^ b).collect();
        let stored = digest::digest(m.digest(), &client_key);
        if !same(stored.as_ref(), &credential.stored_key) {
            return Err(bad("wrong password"));
        }
        let server_signature = m.hmac_sign(&credential.server_key, auth_message.as_bytes());
        Ok(format!("v={}", BASE64.encode(server_signature)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange(mechanism: Mechanism, stored: &str, given: &str) -> Result<(), ScramError> {
        let credential = Credential::derive(mechanism, stored, ITERATIONS_MIN);
        let mut client = ClientExchange::new(mechanism, "alice", given);
        let mut server = ServerExchange::start(&client.first())?;
        assert_eq!(server.user, "alice");
        let first = server.server_first(&credential.salt, credential.iterations);
        let last = client.finish(&first)?;
        let answer = server.finish(&last, &credential)?;
        client.verify(&answer)
    }

    #[test]
    fn the_right_password_authenticates_both_ways() {
        exchange(Mechanism::Sha256, "secret", "secret").expect("sha-256");
        exchange(Mechanism::Sha512, "secret", "secret").expect("sha-512");
    }

    #[test]
    fn a_wrong_password_fails() {
        let err = exchange(Mechanism::Sha256, "secret", "Secret").expect_err("wrong password");
        assert!(err.0.contains("wrong password"), "{err}");
    }

    #[test]
    fn rfc_7677_test_vector() {
        // RFC 7677 section 3: user "user", password "pencil".
        let m = Mechanism::Sha256;
        let salt = BASE64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").expect("salt");
        let salted = salted_password(m, "pencil", &salt, 4096);
        let client_key = m.hmac_sign(&salted, b"Client Key");
        let stored = digest::digest(m.digest(), &client_key);
        let auth = "n=user,r=rOprNGfwEbeRWgbNEkqO,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
        let signature = m.hmac_sign(stored.as_ref(), auth.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(&signature)
            .map(|(a, b)| a ^ b)
            .collect();
        assert_eq!(
            BASE64.encode(proof),
            "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        let server_key = m.hmac_sign(&salted, b"Server Key");
        assert_eq!(
            BASE64.encode(m.hmac_sign(&server_key, auth.as_bytes())),
            "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
    }

    #[test]
    fn mechanism_names_parse() {
        assert_eq!(Mechanism::parse("SCRAM-SHA-512"), Some(Mechanism::Sha512));
        assert_eq!(Mechanism::parse("sha-256"), Some(Mechanism::Sha256));
        assert_eq!(Mechanism::parse("md5"), None);
    }
}
