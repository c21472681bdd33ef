package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/tenantpg/tenantpg/internal/pgtest"
)

// password is the app role's password. It is distinctive so that the test
// can check it appears nowhere in the output, the CSV or the plot's labels;
// no DSN is ever printed.
const password = "bench-Pw-9f3Kq2-never-printed"

// world is the server side of the benchmark: a throwaway PostgreSQL (or the
// server DATABASE_URL names), an app role whose CONNECTION LIMIT is the
// budget, so that every connection beyond it is refused by the server itself
// and counted, a template database holding the kv table, and the workspace
// databases copied from it.
type world struct {
	srv      *pgtest.Server
	role     string
	template string   // full name of the template database
	labels   []string // ws_00000, ... for every workspace created so far
	names    []string // their full database names
	rows     int
	external bool // DATABASE_URL: not our server, so no disk check
}

// databaseOverhead is what max_connections must leave above the budget:
// superuser_reserved_connections (3), the harness's admin pool (4) and the
// peak sampler, and backends the server forks for connections it is about
// to refuse (each refused dial is a short-lived backend until the role's
// limit is checked).
const databaseOverhead = 30

func startWorld(ctx context.Context, budget, workers, rows int, settings []string, tls bool, log io.Writer) (*world, error) {
	external := false
	if u := os.Getenv("DATABASE_URL"); u != "" {
		// As examples/internal/demo does: a superuser URL; everything is created
		// under a per-run prefix and dropped at the end.
		os.Setenv(pgtest.EnvURL, u)
	}
	if os.Getenv(pgtest.EnvURL) != "" {
		external = true
	}
	set := make(map[string]string, len(settings))
	for _, kv := range settings {
		k, v, _ := strings.Cut(kv, "=") // checked by the options
		set[strings.TrimSpace(k)] = v
	}
	srv, err := pgtest.Start(pgtest.Options{MaxConnections: budget + workers + databaseOverhead, Settings: set, TLS: tls})
	if err != nil {
		return nil, err
	}
	w := &world{srv: srv, rows: rows, external: external}
	if w.role, err = srv.CreateRole(ctx, "bench_app", password, budget); err != nil {
		w.stop()
		return nil, fmt.Errorf("create the app role: %w", err)
	}
	start := time.Now()
	tmpl, err := srv.CreateDatabases(ctx, w.role, "", "bench_template")
	if err != nil {
		w.stop()
		return nil, fmt.Errorf("create the template database: %w", err)
	}
	w.template = tmpl[0]
	// One template with the table, copied by CREATE DATABASE ... TEMPLATE:
	// creating the table W times over would cost W more round trips and
	// catalog writes each.
	err = srv.Exec(ctx, w.template,
		"CREATE TABLE kv (id int PRIMARY KEY, v text NOT NULL)",
		fmt.Sprintf("INSERT INTO kv SELECT g, md5(g::text) FROM generate_series(1, %d) g", rows),
		"ALTER TABLE kv OWNER TO "+pgtest.QuoteIdent(w.role),
		"VACUUM ANALYZE kv")
	if err != nil {
		w.stop()
		return nil, fmt.Errorf("fill the template database: %w", err)
	}
	fmt.Fprintf(log, "template database with kv (%d rows) ready in %s\n", rows, time.Since(start).Round(time.Millisecond))
	return w, nil
}

func (w *world) stop() { _ = w.srv.Stop() }

func label(i int) string { return fmt.Sprintf("ws_%05d", i) }

// ensureDatabases creates workspace databases until there are n, and
// returns how many it created and how long that took. Runs with several
// workspace counts share the databases: 2,000 after 400 creates 1,600.
func (w *world) ensureDatabases(ctx context.Context, n int, log io.Writer) (int, time.Duration, error) {
	have := len(w.labels)
	if n <= have {
		return 0, 0, nil
	}
	if err := w.checkDisk(ctx, n-have); err != nil {
		return 0, 0, err
	}
	labels := make([]string, 0, n-have)
	for i := have; i < n; i++ {
		labels = append(labels, label(i))
	}
	start := time.Now()
	// In batches, so that the progress line moves and an interrupt is not
	// held up by thousands of queued goroutines.
	const batch = 200
	for lo := 0; lo < len(labels); lo += batch {
		hi := min(lo+batch, len(labels))
		names, err := w.srv.CreateDatabases(ctx, w.role, w.template, labels[lo:hi]...)
		if err != nil {
			return 0, 0, fmt.Errorf("create workspace databases %s..%s: %w", labels[lo], labels[hi-1], err)
		}
		w.labels = append(w.labels, labels[lo:hi]...)
		w.names = append(w.names, names...)
		if hi < len(labels) {
			fmt.Fprintf(log, "  %d/%d databases in %s\n", hi, len(labels), time.Since(start).Round(time.Second))
		}
	}
	return len(labels), time.Since(start), nil
}

// warm connects once to each workspace database in [from, to) and reads
// one row, so that every contender meets a server in its steady state.
// A database's first session builds its relation cache init file
// (pg_internal.init) from the catalogs, work a later session skips, and
// CREATE DATABASE does not copy that file from the template:
// unwarmed, the contender that runs first pays for the first session of
// every database it reaches and the later ones find the files built.
func (w *world) warm(ctx context.Context, from, to int) error {
	const parallel = 4 // within every budget the harness allows (at least 8)
	next := make(chan int)
	errs := make(chan error, parallel)
	for range parallel {
		go func() {
			var first error
			for i := range next {
				if first != nil {
					continue
				}
				conn, err := pgx.Connect(ctx, w.dsn(i))
				if err == nil {
					var v string
					err = conn.QueryRow(ctx, queryRead, 1).Scan(&v)
					err = errors.Join(err, conn.Close(ctx))
				}
				if err != nil {
					first = fmt.Errorf("warm workspace %s: %w", w.labels[i], err)
				}
			}
			errs <- first
		}()
	}
	for i := from; i < to; i++ {
		select {
		case next <- i:
		case <-ctx.Done():
			i = to
		}
	}
	close(next)
	var all []error
	for range parallel {
		all = append(all, <-errs)
	}
	return errors.Join(append(all, ctx.Err())...)
}

// checkDisk refuses to create more databases than the disk holding the
// throwaway server's data directory has room for. Every database is a copy
// of the template's files, about 7.5 MB on PostgreSQL 15 (nearly all of it
// the system catalogs), so 10,000 workspaces need about 75 GB.
func (w *world) checkDisk(ctx context.Context, count int) error {
	if w.external {
		return nil
	}
	var size int64
	var dir string
	admin := w.srv.Admin()
	if err := admin.QueryRowContext(ctx, "SELECT pg_database_size($1)", w.template).Scan(&size); err != nil {
		return fmt.Errorf("size of the template database: %w", err)
	}
	if err := admin.QueryRowContext(ctx, "SHOW data_directory").Scan(&dir); err != nil {
		return fmt.Errorf("data directory: %w", err)
	}
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return nil // not visible from here: nothing to check against
	}
	free := int64(st.Bavail) * int64(st.Bsize)
	need := size * int64(count)
	// Room left for WAL, the OS and the disk's other users: running a
	// shared disk full would break more than this benchmark.
	margin := int64(5<<30) + free/10
	if need+margin > free {
		return fmt.Errorf("%d more workspace databases need about %.1f GB (%.1f MB each) plus %.1f GB to spare, but only %.1f GB are free on the disk of %s",
			count, gb(need), float64(size)/(1<<20), gb(margin), gb(free), dir)
	}
	return nil
}

func gb(b int64) float64 { return float64(b) / (1 << 30) }

// dsn is the plain pgx connection string of workspace i. It holds the
// password: it is passed to drivers, never printed.
func (w *world) dsn(i int) string { return w.srv.URL(w.role, password, w.names[i]) }

// dsnVia is the connection string of workspace i through a proxy listening
// on host:port, with extra query parameters.
func (w *world) dsnVia(i int, host string, port int, extra url.Values) string {
	u, err := url.Parse(w.dsn(i))
	if err != nil {
		panic(err) // pgtest.Server.URL builds it with net/url
	}
	u.Host = net.JoinHostPort(host, strconv.Itoa(port))
	q := u.Query()
	for k, vs := range extra {
		q[k] = vs
	}
	u.RawQuery = q.Encode()
	return u.String()
}

// sessions returns the number of sessions ever established to the workspace
// databases (pg_stat_database.sessions, PostgreSQL 14 and later), or -1
// when the server does not count them. A refused connection is not a
// session: the role's limit is checked before a session is counted. A
// backend reports its session to the statistics by the time it leaves
// pg_stat_activity, so once the app role has no backends the counter is
// final; it is read until two reads agree anyway.
func (w *world) sessions(ctx context.Context) (int64, error) {
	read := func() (int64, error) {
		var n int64
		err := w.srv.Admin().QueryRowContext(ctx,
			"SELECT coalesce(sum(sessions), 0)::bigint FROM pg_stat_database WHERE starts_with(datname, $1)",
			w.srv.Prefix+"ws_").Scan(&n)
		return n, err
	}
	prev, err := read()
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "42703" { // undefined_column: before PostgreSQL 14
		return -1, nil
	}
	if err != nil {
		return 0, fmt.Errorf("read pg_stat_database.sessions: %w", err)
	}
	for range 50 {
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
		n, err := read()
		if err != nil {
			return 0, fmt.Errorf("read pg_stat_database.sessions: %w", err)
		}
		if n == prev {
			return n, nil
		}
		prev = n
	}
	return prev, nil
}

// waitQuiet waits until the app role has no backends on the server, so that
// one contender's connections neither count against the next one's limit
// nor show in its peak.
func (w *world) waitQuiet(ctx context.Context, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		n, err := w.srv.Backends(ctx, w.role)
		if err != nil {
			return fmt.Errorf("count the app role's backends: %w", err)
		}
		if n == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the app role still has %d backends %s after the contender closed its connections", n, timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// serverVersion returns the server's version string, for the report.
func (w *world) serverVersion(ctx context.Context) string {
	var v string
	if err := w.srv.Admin().QueryRowContext(ctx, "SHOW server_version").Scan(&v); err != nil {
		return "unknown"
	}
	return v
}
