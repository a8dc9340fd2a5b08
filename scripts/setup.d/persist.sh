# persist-worker: its tests and deploy/up.sh's demo write into PostgreSQL and MariaDB on
# 127.0.0.1 as the machine's services are reached (postgres@127.0.0.1:5432/test without a
# password; root@127.0.0.1:3306/test without a password). Servers already listening are used as
# they are; a missing one is installed from Debian's packages, started and given that access —
# local throwaway access for a development machine, never for a server others reach.
# Sourced by scripts/setup.sh (uses apt_install, port_open, wait_port, log, $SUDO).

as_postgres() { # runs a command as the postgres OS user (peer authentication on the socket)
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi
}

command -v psql >/dev/null || apt_install postgresql-client
if ! port_open 5432; then
  command -v pg_ctlcluster >/dev/null || apt_install postgresql
  version=$(ls /etc/postgresql | sort -V | tail -1)
  hba=/etc/postgresql/$version/main/pg_hba.conf
  # Loopback connections as in CI: trusted, first in the file so they win.
  if ! $SUDO grep -q '^host all all 127.0.0.1/32 trust' "$hba"; then
    log "PostgreSQL $version: trusting loopback connections ($hba)"
    $SUDO sed -i '1i host all all 127.0.0.1/32 trust' "$hba"
  fi
  log "starting PostgreSQL $version on 127.0.0.1:5432"
  $SUDO pg_ctlcluster "$version" main start 2>/dev/null || $SUDO pg_ctlcluster "$version" main reload
  wait_port 5432 PostgreSQL
fi
if ! psql -h 127.0.0.1 -U postgres -d test -tAc 'SELECT 1' >/dev/null 2>&1; then
  log "creating PostgreSQL database test"
  as_postgres createdb test 2>/dev/null || psql -h 127.0.0.1 -U postgres -c 'CREATE DATABASE test' >/dev/null
fi

command -v mariadb >/dev/null || apt_install mariadb-client
if ! port_open 3306; then
  command -v mariadbd >/dev/null || apt_install mariadb-server
  log "starting MariaDB on 127.0.0.1:3306"
  if command -v systemctl >/dev/null && systemctl is-system-running >/dev/null 2>&1; then
    $SUDO systemctl start mariadb
  else
    $SUDO service mariadb start
  fi
  wait_port 3306 MariaDB
  # Debian's root logs in through its unix socket only; let it in over TCP without a password.
  $SUDO mariadb -e "ALTER USER root@localhost IDENTIFIED VIA unix_socket OR mysql_native_password USING PASSWORD('')"
fi
if ! mariadb -h 127.0.0.1 -u root -e 'USE test' >/dev/null 2>&1; then
  log "creating MariaDB database test"
  $SUDO mariadb -e 'CREATE DATABASE IF NOT EXISTS test'
fi
