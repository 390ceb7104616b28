-- Run once by the postgres image on an empty data volume (mounted into /docker-entrypoint-initdb.d/).
-- Each service owns its own database; all belong to the POSTGRES_USER that runs this script.
CREATE DATABASE feedback;
CREATE DATABASE reward;
CREATE DATABASE policy;
CREATE DATABASE inference;
