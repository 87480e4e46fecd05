use super::*;

#[test]
fn the_example_domain_loads() {
    let domain = Domain::from_toml_str(EXAMPLE_DOMAIN).unwrap();
    assert!(domain.aggregate("account").is_some());
}
