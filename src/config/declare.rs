//! The `settings!` macro: from one declaration per setting (name, type, default, value name,
//! doc) it derives the [`Settings`](super::Settings) layer (clap flags and TOML keys, with the
//! default in each flag's help), the layer merge, the resolved [`Config`](super::Config) with
//! its `Default`, and [`SETTINGS`](super::SETTINGS), the table `sidecast config` prints.
//!
//! Sections, in the order `--help` lists them:
//! - `values`: always set; the default is parsed from its declared text, so help, file and
//!   code cannot disagree;
//! - `options`: off unless given (`Option` in `Config`);
//! - `inputs`: flags and keys that `Config` holds only through a `derived` field;
//! - `lists`: repeatable flags, TOML arrays;
//! - `files`: TOML sections with no flag (they hold tables);
//! - `derived`: `Config` fields computed from the merged settings by a function.

/// See the module documentation.
macro_rules! settings {
    (
        values { $( $v:ident : $vty:ty = $vdefault:literal, $vname:literal, $vdoc:literal
                    $([ $($varg:tt)* ])? ; )* }
        options { $( $o:ident : $oty:ty, $oname:literal, $odoc:literal, $ooff:literal ; )* }
        inputs { $( $i:ident : $ity:ty, $iname:literal, $idoc:literal, $ioff:literal ; )* }
        lists { $( $l:ident : $lty:ty, $lname:literal, $ldoc:literal, $loff:literal
                   $([ $($larg:tt)* ])? ; )* }
        files { $( $f:ident : $fty:ty, $fdoc:literal ; )* }
        derived { $( $(#[doc = $ddoc:literal])* $d:ident : $dty:ty = $dfn:path ; )* }
    ) => {
        /// The `serve` settings: command-line flags and TOML keys (every flag `--some-name` is
        /// the key `some_name`). Unset fields take the defaults.
        #[derive(clap::Args, serde::Deserialize, Clone, Debug, Default)]
        #[serde(deny_unknown_fields)]
        pub struct Settings {
            /// TOML file with settings (keys are the flag names in snake_case); flags override it
            #[arg(long, value_name = "FILE")]
            #[serde(skip)]
            pub config: Option<std::path::PathBuf>,
            $(
                #[doc = $vdoc]
                #[arg(long, value_name = $vname, help = concat!($vdoc, " [default: ", $vdefault, "]")
                      $(, $($varg)*)?)]
                #[serde(default, deserialize_with = "values::parse")]
                pub $v: Option<$vty>,
            )*
            $(
                #[doc = $odoc]
                #[arg(long, value_name = $oname, help = concat!($odoc, " [default: none, ", $ooff, "]"))]
                #[serde(default, deserialize_with = "values::parse")]
                pub $o: Option<$oty>,
            )*
            $(
                #[doc = $idoc]
                #[arg(long, value_name = $iname, help = concat!($idoc, " [default: none, ", $ioff, "]"))]
                #[serde(default, deserialize_with = "values::parse")]
                pub $i: Option<$ity>,
            )*
            $(
                #[doc = $ldoc]
                #[arg(long, value_name = $lname, help = concat!($ldoc, " [default: none, ", $loff, "]")
                      $(, $($larg)*)?)]
                #[serde(default, deserialize_with = "values::parse_list")]
                pub $l: Vec<$lty>,
            )*
            $(
                #[doc = $fdoc]
                #[arg(skip)]
                #[serde(default)]
                pub $f: $fty,
            )*
        }

        impl Settings {
            /// `self` with every unset field taken from `lower`.
            pub fn over(self, lower: Settings) -> Settings {
                Settings {
                    config: self.config.or(lower.config),
                    $( $v: self.$v.or(lower.$v), )*
                    $( $o: self.$o.or(lower.$o), )*
                    $( $i: self.$i.or(lower.$i), )*
                    $( $l: if self.$l.is_empty() { lower.$l } else { self.$l }, )*
                    $( $f: if self.$f == <$fty>::default() { lower.$f } else { self.$f }, )*
                }
            }
        }

        /// The resolved configuration of a server: every setting, defaults filled in.
        #[derive(Clone, Debug, PartialEq)]
        pub struct Config {
            $( #[doc = $vdoc] pub $v: <$vty as Setting>::Value, )*
            $( #[doc = $odoc] pub $o: Option<<$oty as Setting>::Value>, )*
            $( #[doc = $ldoc] pub $l: Vec<<$lty as Setting>::Value>, )*
            $( $(#[doc = $ddoc])* pub $d: $dty, )*
        }

        impl Default for Config {
            fn default() -> Config {
                Config {
                    $( $v: declared_default::<$vty>(stringify!($v), $vdefault), )*
                    $( $o: None, )*
                    $( $l: Vec::new(), )*
                    $( $d: Default::default(), )*
                }
            }
        }

        impl Config {
            /// Fills unset settings with defaults and validates the result.
            ///
            /// # Errors
            /// [`ConfigError::Invalid`] naming the setting at fault.
            pub fn from_settings(s: Settings) -> Result<Config, ConfigError> {
                let config = Config {
                    $( $d: $dfn(&s)?, )*
                    $( $v: match s.$v {
                        Some(value) => value.value(),
                        None => declared_default::<$vty>(stringify!($v), $vdefault),
                    }, )*
                    $( $o: s.$o.map(Setting::value), )*
                    $( $l: s.$l.into_iter().map(Setting::value).collect(), )*
                };
                config.validate()?;
                Ok(config)
            }
        }

        /// Every setting, in `--help` order: what `sidecast config` prints.
        pub const SETTINGS: &[Declared] = &[
            $( Declared { key: stringify!($v), value_name: $vname, doc: $vdoc,
                          default: Some($vdefault), quoted: <$vty as Setting>::QUOTED,
                          list: false }, )*
            $( Declared { key: stringify!($o), value_name: $oname, doc: $odoc, default: None,
                          quoted: <$oty as Setting>::QUOTED, list: false }, )*
            $( Declared { key: stringify!($i), value_name: $iname, doc: $idoc, default: None,
                          quoted: <$ity as Setting>::QUOTED, list: false }, )*
            $( Declared { key: stringify!($l), value_name: $lname, doc: $ldoc, default: None,
                          quoted: <$lty as Setting>::QUOTED, list: true }, )*
        ];
    };
}

pub(super) use settings;
