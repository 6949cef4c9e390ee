//! Loads courier definitions in the public tracking_number_data schema (one file per courier:
//! `courier_code` and `tracking_numbers[]` with `regex`, `validation.checksum`,
//! `serial_number_format.prepend_if` and `additional` lookups), so users can add or update
//! formats without a new build.

use std::path::Path;

use fancy_regex::Regex;
use serde::Deserialize;

use super::{CarrierError, Checksum, Format, Match, ServiceLookup};

#[derive(Deserialize)]
struct CourierFile {
    courier_code: String,
    tracking_numbers: Vec<Definition>,
}

#[derive(Deserialize)]
struct Definition {
    id: Option<String>,
    name: String,
    regex: Pattern,
    #[serde(default)]
    validation: Validation,
    serial_number_format: Option<SerialNumberFormat>,
    #[serde(default)]
    additional: Vec<Additional>,
}

/// A regex given whole or in pieces to concatenate.
#[derive(Deserialize)]
#[serde(untagged)]
enum Pattern {
    One(String),
    Pieces(Vec<String>),
}

#[derive(Default, Deserialize)]
struct Validation {
    checksum: Option<Checksum>,
    additional: Option<Exists>,
    /// Some files put it here rather than beside `validation`.
    serial_number_format: Option<SerialNumberFormat>,
}

#[derive(Deserialize)]
struct Exists {
    exists: Vec<String>,
}

#[derive(Deserialize)]
struct SerialNumberFormat {
    prepend_if: Option<PrependIf>,
}

#[derive(Deserialize)]
struct PrependIf {
    matches_regex: String,
    content: String,
}

#[derive(Deserialize)]
struct Additional {
    name: String,
    regex_group_name: String,
    lookup: Vec<Lookup>,
}

#[derive(Deserialize)]
struct Lookup {
    matches: Option<String>,
    matches_regex: Option<String>,
    name: Option<String>,
    courier: Option<String>,
}

pub(super) fn load(path: &Path) -> Result<Vec<Format>, CarrierError> {
    let failed = |reason: String| CarrierError::File {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| failed(e.to_string()))?;
    let file: CourierFile = serde_json::from_str(&text).map_err(|e| failed(e.to_string()))?;
    file.tracking_numbers
        .into_iter()
        .map(|def| compile(&file.courier_code, def))
        .collect()
}

fn compile(courier: &str, def: Definition) -> Result<Format, CarrierError> {
    let id = def.id.unwrap_or(def.name);
    let regex = match def.regex {
        Pattern::One(r) => r,
        Pattern::Pieces(pieces) => pieces.concat(),
    };
    let pattern = |r: &str| {
        Regex::new(r).map_err(|e| CarrierError::Regex {
            format: id.clone(),
            reason: e.to_string(),
        })
    };
    let mut format = Format::new(
        courier,
        &id,
        &regex,
        def.validation.checksum.unwrap_or(Checksum::None),
    )?;
    let serial_format = def
        .serial_number_format
        .or(def.validation.serial_number_format);
    if let Some(prepend) = serial_format.and_then(|f| f.prepend_if) {
        format.prepend_if = Some((pattern(&prepend.matches_regex)?, prepend.content));
    }
    let required = def
        .validation
        .additional
        .map(|a| a.exists)
        .unwrap_or_default();
    for additional in def.additional {
        let entries = additional
            .lookup
            .iter()
            .map(|l| {
                let label = l
                    .name
                    .clone()
                    .or_else(|| l.courier.clone())
                    .unwrap_or_default();
                let matcher = match (&l.matches, &l.matches_regex) {
                    (Some(exact), _) => Match::Exact(exact.clone()),
                    (None, Some(r)) => Match::Pattern(pattern(&format!("^(?:{r})$"))?),
                    (None, None) => Match::Exact(String::new()),
                };
                Ok((matcher, label))
            })
            .collect::<Result<Vec<_>, CarrierError>>()?;
        if required.contains(&additional.name) {
            let allowed = entries
                .iter()
                .filter_map(|(m, _)| match m {
                    Match::Exact(s) => Some(s.clone()),
                    Match::Pattern(_) => None,
                })
                .collect();
            format.must_exist = Some((additional.regex_group_name.clone(), allowed));
        }
        if additional.name.contains("Service") && format.service.is_none() {
            format.service = Some(ServiceLookup {
                group: additional.regex_group_name,
                entries,
            });
        }
    }
    Ok(format)
}
