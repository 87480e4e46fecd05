//! Incremental aggregation measures: the state kept per group and measure, and
//! how a row is read from it. Integers stay integers as long as they fit, so a
//! sum of whole amounts reads as a whole number.

use serde_json::{Map, Number, Value as Json};

use crate::domain::{AggregationDef, MeasureKind};

/// Adds two numbers, exactly for integers; `None` when the result is not finite.
fn add(a: &Number, b: &Number) -> Option<Number> {
    if let (Some(x), Some(y)) = (a.as_i64(), b.as_i64())
        && let Some(sum) = x.checked_add(y)
    {
        return Some(Number::from(sum));
    }
    Number::from_f64(a.as_f64()? + b.as_f64()?)
}

fn less(a: &Number, b: &Number) -> bool {
    match (a.as_i64(), b.as_i64()) {
        (Some(x), Some(y)) => x < y,
        _ => a.as_f64().unwrap_or(f64::NAN) < b.as_f64().unwrap_or(f64::NAN),
    }
}

/// A fresh state for a group: `{"group": {...}, "measures": [{count, sum, min, max}, ...]}`.
pub fn new_group(def: &AggregationDef, group: Map<String, Json>) -> Json {
    let measures: Vec<Json> = def
        .measures()
        .iter()
        .map(|_| serde_json::json!({"count": 0, "sum": null, "min": null, "max": null}))
        .collect();
    serde_json::json!({"group": group, "measures": measures})
}

/// Folds one event's measure inputs into a group's state. Fails (and changes
/// nothing) when a sum would leave the range of finite numbers.
pub fn update(state: &mut Json, inputs: &[Option<Number>]) -> Result<(), String> {
    let Some(measures) = state.get_mut("measures").and_then(Json::as_array_mut) else {
        return Err("stored group state has no measures".to_owned());
    };
    let mut updated = measures.clone();
    for (measure, input) in updated.iter_mut().zip(inputs) {
        let count = measure.get("count").and_then(Json::as_u64).unwrap_or(0);
        measure["count"] = Json::from(count.saturating_add(1));
        let Some(input) = input else { continue };
        let sum = match measure.get("sum") {
            Some(Json::Number(sum)) => add(sum, input).ok_or("the sum is out of range")?,
            _ => input.clone(),
        };
        measure["sum"] = Json::Number(sum);
        match measure.get("min") {
            Some(Json::Number(min)) if !less(input, min) => {}
            _ => measure["min"] = Json::Number(input.clone()),
        }
        match measure.get("max") {
            Some(Json::Number(max)) if !less(max, input) => {}
            _ => measure["max"] = Json::Number(input.clone()),
        }
    }
    *measures = updated;
    Ok(())
}

/// The row of a group: its group fields and each measure's value.
pub fn row(def: &AggregationDef, state: &Json) -> Json {
    let mut row = state
        .get("group")
        .and_then(Json::as_object)
        .cloned()
        .unwrap_or_default();
    let empty = Vec::new();
    let measures = state
        .get("measures")
        .and_then(Json::as_array)
        .unwrap_or(&empty);
    for (measure, stored) in def.measures().iter().zip(measures) {
        let count = stored.get("count").and_then(Json::as_u64).unwrap_or(0);
        let value = match measure.kind {
            MeasureKind::Count => Json::from(count),
            MeasureKind::Sum => stored.get("sum").cloned().unwrap_or(Json::Null),
            MeasureKind::Min => stored.get("min").cloned().unwrap_or(Json::Null),
            MeasureKind::Max => stored.get("max").cloned().unwrap_or(Json::Null),
            MeasureKind::Avg => match stored.get("sum").and_then(Json::as_f64) {
                Some(sum) if count > 0 => Number::from_f64(sum / count as f64)
                    .map(Json::Number)
                    .unwrap_or(Json::Null),
                _ => Json::Null,
            },
        };
        let value = match (measure.kind, value) {
            (MeasureKind::Sum, Json::Null) => Json::from(0),
            (_, value) => value,
        };
        row.insert(measure.name.clone(), value);
    }
    Json::Object(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_stay_integers_and_decimals_mix_in() {
        let a = Number::from(2);
        assert_eq!(add(&a, &Number::from(3)), Some(Number::from(5)));
        assert_eq!(
            add(&a, &Number::from_f64(0.5).unwrap()),
            Number::from_f64(2.5)
        );
        assert_eq!(
            add(&Number::from(i64::MAX), &Number::from(1)).map(|n| n.as_f64()),
            Some(Some(i64::MAX as f64 + 1.0))
        );
        assert!(less(&Number::from(-1), &Number::from_f64(-0.5).unwrap()));
    }
}
