//! A value passed through in Postgres's binary format untouched: the batch's key array goes
//! from the key query straight into `statement`'s $1, whatever the key's type.

use bytes::BytesMut;
use postgres_types::{FromSql, IsNull, ToSql, Type, to_sql_checked};
use std::error::Error;

/// Binary-format bytes of one value and the type they were read as.
#[derive(Debug, Clone)]
pub struct RawValue {
    ty: Type,
    bytes: Vec<u8>,
}

impl<'a> FromSql<'a> for RawValue {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn Error + Sync + Send>> {
        Ok(RawValue {
            ty: ty.clone(),
            bytes: raw.to_vec(),
        })
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

impl ToSql for RawValue {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        if ty.oid() != self.ty.oid() {
            return Err(format!(
                "parameter is {} but the keys are {}",
                ty.name(),
                self.ty.name()
            )
            .into());
        }
        out.extend_from_slice(&self.bytes);
        Ok(IsNull::No)
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}
