//! Named options (`loss_type = "dapo"`, `kl_estimator = "k1"`, ...): each enum lists its TRL names
//! once, here in its `named_option!` call, and gets `FromStr`, `Display` and serde from that list,
//! so the run file, the CLI and the error messages all read the same names.

/// Gives an enum `ALL`, `name()`, `names()`, `FromStr`, `Display`, `Serialize` and `Deserialize`
/// from one table of `Variant => "name"`. `$what` names the option in errors, which list every
/// accepted name.
#[macro_export]
macro_rules! named_option {
    ($ty:ident, $what:literal, [$($var:ident => $name:literal),+ $(,)?]) => {
        impl $ty {
            /// Every value, in the order the names are listed.
            pub const ALL: &'static [$ty] = &[$($ty::$var),+];

            /// The name used in the run file (TRL's spelling).
            pub fn name(self) -> &'static str {
                match self {
                    $($ty::$var => $name),+
                }
            }

            /// Every accepted name.
            pub fn names() -> Vec<&'static str> {
                Self::ALL.iter().map(|v| v.name()).collect()
            }
        }

        impl ::std::str::FromStr for $ty {
            type Err = ::anyhow::Error;

            fn from_str(s: &str) -> ::anyhow::Result<Self> {
                Self::ALL
                    .iter()
                    .copied()
                    .find(|v| v.name() == s)
                    .ok_or_else(|| {
                        ::anyhow::anyhow!(
                            "unknown {} {:?}; expected one of {}",
                            $what,
                            s,
                            Self::names().join(", ")
                        )
                    })
            }
        }

        impl ::std::fmt::Display for $ty {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.name())
            }
        }

        impl ::serde::Serialize for $ty {
            fn serialize<S: ::serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.name())
            }
        }

        impl<'de> ::serde::Deserialize<'de> for $ty {
            fn deserialize<D: ::serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <String as ::serde::Deserialize>::deserialize(d)?;
                <Self as ::std::str::FromStr>::from_str(&s)
                    .map_err(|e| <D::Error as ::serde::de::Error>::custom(e))
            }
        }
    };
}

/// Deserializes either one name or a list of names into a `Vec` (TRL accepts
/// `loss_type = "sigmoid"` as well as `loss_type = ["sigmoid", "ipo"]`). A wrong name keeps its
/// own error, which lists the accepted names.
pub fn one_or_many<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr<Err = anyhow::Error>,
{
    struct V<T>(std::marker::PhantomData<T>);
    impl<'de, T: std::str::FromStr<Err = anyhow::Error>> serde::de::Visitor<'de> for V<T> {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a name or a list of names")
        }

        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Vec<T>, E> {
            s.parse().map(|x| vec![x]).map_err(E::custom)
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut out = Vec::new();
            while let Some(s) = seq.next_element::<String>()? {
                out.push(s.parse().map_err(<A::Error as serde::de::Error>::custom)?);
            }
            Ok(out)
        }
    }
    d.deserialize_any(V(std::marker::PhantomData))
}

#[cfg(test)]
mod tests {
    use crate::losses::{DpoLossType, GrpoLossType};

    #[derive(serde::Deserialize)]
    struct Holder {
        #[serde(deserialize_with = "super::one_or_many")]
        loss_type: Vec<DpoLossType>,
    }

    #[test]
    fn names_round_trip_and_errors_list_them() {
        for t in GrpoLossType::ALL {
            assert_eq!(t.name().parse::<GrpoLossType>().unwrap(), *t);
        }
        let e = "nope".parse::<GrpoLossType>().unwrap_err().to_string();
        assert!(e.contains("nope"), "{e}");
        for n in ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo"] {
            assert!(e.contains(n), "{e}");
        }
    }

    #[test]
    fn one_or_many_accepts_both_forms() {
        let one: Holder = serde_json::from_str(r#"{"loss_type": "ipo"}"#).unwrap();
        assert_eq!(one.loss_type, vec![DpoLossType::Ipo]);
        let many: Holder = serde_json::from_str(r#"{"loss_type": ["ipo", "hinge"]}"#).unwrap();
        assert_eq!(many.loss_type, vec![DpoLossType::Ipo, DpoLossType::Hinge]);
        let bad = serde_json::from_str::<Holder>(r#"{"loss_type": ["ipo", "x"]}"#);
        let e = bad.err().unwrap().to_string();
        assert!(e.contains("sigmoid") && e.contains("\"x\""), "{e}");
    }
}
