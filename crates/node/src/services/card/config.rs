//! Capability-card settings: the `[card]` section.

use std::collections::BTreeMap;

use peer_core::rate::Class;
use serde::{Deserialize, Serialize};

use super::signed::{CardContent, Skill, check_namespace};

/// Capability-card settings. The card's content may be declared here (set
/// `name`; `description`, `version`, `skills` and `accepts` go with it): it
/// then replaces, at every start, whatever `PUT /v1/card` set before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CardConfig {
    /// The agent's name; set it to declare the card in the configuration.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// What the agent does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The agent's own version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// What the agent can be asked to do.
    pub skills: Vec<Skill>,
    /// Namespaces of the application-defined message types the agent takes
    /// (`chat` takes `chat.message`); any other namespaced type is refused
    /// `UNSUPPORTED_MSG_TYPE`.
    pub accepts: Vec<String>,
    /// The rate class of a namespace's message types, by namespace
    /// (`chat = "heartbeat"`); a namespace not named here counts against
    /// `task`.
    pub namespace_classes: BTreeMap<String, String>,
    /// Largest card accepted from a peer or set here, in bytes of its
    /// `capability_response` payload (default 16,384; at least 1,024).
    pub max_bytes: usize,
    /// Most peer cards kept; beyond it the one stored longest ago goes
    /// (default 1,024; at least 1).
    pub max_peers: usize,
    /// A peer's card is forgotten this many seconds after it arrived
    /// (default 3,600; at least 1); a connected peer's is asked for again
    /// when wanted.
    pub expiry_secs: u64,
}

impl Default for CardConfig {
    fn default() -> Self {
        Self {
            name: None,
            description: None,
            version: None,
            skills: Vec::new(),
            accepts: Vec::new(),
            namespace_classes: BTreeMap::new(),
            max_bytes: 16 * 1024,
            max_peers: 1024,
            expiry_secs: 3600,
        }
    }
}

/// The class named `name` (`task`, `heartbeat`, ...).
fn class_named(name: &str) -> Option<Class> {
    Class::ALL.into_iter().find(|c| c.as_str() == name)
}

impl CardConfig {
    /// The card content declared here, if `name` is set.
    pub fn content(&self) -> Option<CardContent> {
        Some(CardContent {
            name: self.name.clone()?,
            description: self.description.clone().unwrap_or_default(),
            version: self.version.clone().unwrap_or_default(),
            skills: self.skills.clone(),
            accepts: self.accepts.clone(),
        })
    }

    /// The classes of `namespace_classes` (checked by [`CardConfig::validate`]).
    pub fn classes(&self) -> impl Iterator<Item = (String, Class)> + '_ {
        self.namespace_classes
            .iter()
            .filter_map(|(ns, c)| Some((ns.clone(), class_named(c)?)))
    }

    /// Checks the values against their limits and each other.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_bytes < 1024 {
            return Err(format!(
                "card.max_bytes is {}; it must be at least 1024",
                self.max_bytes
            ));
        }
        if self.max_peers == 0 || self.expiry_secs == 0 {
            return Err("card.max_peers and card.expiry_secs must be at least 1".into());
        }
        if self.expiry_secs > u64::MAX / 1000 {
            return Err(format!(
                "card.expiry_secs is {}; too large",
                self.expiry_secs
            ));
        }
        for (ns, class) in &self.namespace_classes {
            check_namespace(ns).map_err(|e| format!("card.namespace_classes: {e}"))?;
            if class_named(class).is_none() {
                let names: Vec<&str> = Class::ALL.iter().map(|c| c.as_str()).collect();
                return Err(format!(
                    "card.namespace_classes.{ns} is {class:?}; it must be one of {}",
                    names.join(", ")
                ));
            }
        }
        match self.content() {
            Some(content) => content.validate().map_err(|e| format!("card: {e}")),
            None if self.description.is_some()
                || self.version.is_some()
                || !self.skills.is_empty()
                || !self.accepts.is_empty() =>
            {
                Err("card: set card.name to declare the card in the configuration (description, version, skills and accepts go with it)".into())
            }
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn load(toml: &str) -> Result<Config, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("config.toml");
        std::fs::write(&file, toml).expect("write");
        Config::load(Some(&file), toml::Table::new()).map_err(|e| e.to_string())
    }

    #[test]
    fn the_card_section_declares_the_card_and_namespace_classes() {
        let c = load(
            r#"
            [card]
            name = "summariser"
            accepts = ["chat"]
            max_peers = 7
            [[card.skills]]
            id = "sum"
            name = "Summarise"
            tags = ["text"]
            [card.namespace_classes]
            chat = "heartbeat"
            "#,
        )
        .expect("valid");
        let content = c.card.content().expect("declared");
        assert_eq!(
            (content.name.as_str(), content.skills.len()),
            ("summariser", 1)
        );
        let classes: Vec<_> = c.card.classes().collect();
        assert_eq!(
            classes,
            vec![("chat".to_owned(), peer_core::rate::Class::Heartbeat)]
        );
        assert_eq!(c.card.max_peers, 7);
        // What `config show` prints loads back the same.
        let again = load(&c.to_toml()).expect("round trip");
        assert_eq!(again.card, c.card);
        assert!(Config::default().card.content().is_none());
    }

    #[test]
    fn bad_card_settings_are_refused_with_their_key() {
        for (toml, key) in [
            ("[card]\naccepts = [\"chat\"]", "card.name"),
            ("[card]\nname = \"x\"\naccepts = [\"a.b\"]", "accepts"),
            (
                "[card.namespace_classes]\nchat = \"fast\"",
                "card.namespace_classes.chat",
            ),
            ("[card]\nmax_bytes = 10", "card.max_bytes"),
            ("[card]\nmax_peers = 0", "card.max_peers"),
        ] {
            let e = load(toml).expect_err(toml);
            assert!(e.contains(key), "{toml}: {e}");
        }
    }
}
