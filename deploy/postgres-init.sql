-- Runs once, on the first start of the compose PostgreSQL: the results database.
CREATE DATABASE crm;
