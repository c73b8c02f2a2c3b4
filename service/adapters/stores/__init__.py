"""Results stores: where analysed leads are kept (Postgres direct or Supabase REST)."""
