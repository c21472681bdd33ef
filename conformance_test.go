package tenantpg

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/stretchr/testify/require"

	"github.com/tenantpg/tenantpg/internal/pgtest"
)

// TestConformanceWithPgxStdlib runs the same programs through pgx's stdlib
// driver and through tenantpg, each on pools of its own, and requires the
// same transcript from both: any program that works with pgx's stdlib
// works the same through tenantpg, capacity aside. The programs lean on
// database/sql's semantics where a shared or leaky pool would show:
// session state, transactions, errors, cancellation, two pools of one DSN.
func TestConformanceWithPgxStdlib(t *testing.T) {
	e := newEnv(t, 1, Config{MaxConnections: 6, MaxConnectionsPerDB: 3})
	ctx := context.Background()
	require.NoError(t, e.srv.Exec(ctx, e.dbs[0], "CREATE TABLE IF NOT EXISTS items (id int PRIMARY KEY, v text)",
		"GRANT ALL ON items TO "+pgtest.QuoteIdent(e.role)))
	type program struct {
		name string
		run  func(t *testing.T, open func() *sql.DB, log func(string, ...any))
	}
	programs := []program{
		{"a *sql.Conn keeps its session", func(t *testing.T, open func() *sql.DB, log func(string, ...any)) {
			db := open()
			c, err := db.Conn(ctx)
			require.NoError(t, err)
			defer c.Close()
			_, err = c.ExecContext(ctx, "SET application_name = 'pinned'")
			log("set: %v", err)
			_, err = c.ExecContext(ctx, "CREATE TEMP TABLE scratch AS SELECT 1 AS x")
			log("temp: %v", err)
			var name string
			var n int
			log("read: %v", c.QueryRowContext(ctx, "SELECT current_setting('application_name'), (SELECT count(*) FROM scratch)").Scan(&name, &n))
			log("name %s rows %d", name, n)
		}},
		{"transactions commit and roll back", func(t *testing.T, open func() *sql.DB, log func(string, ...any)) {
			db := open()
			_, _ = db.ExecContext(ctx, "DELETE FROM items")
			tx, err := db.BeginTx(ctx, nil)
			require.NoError(t, err)
			_, err = tx.ExecContext(ctx, "INSERT INTO items VALUES (1, 'a')")
			log("insert: %v", err)
			log("rollback: %v", tx.Rollback())
			tx, err = db.BeginTx(ctx, &sql.TxOptions{Isolation: sql.LevelSerializable})
			require.NoError(t, err)
			var level string
			log("level: %v", tx.QueryRowContext(ctx, "SHOW transaction_isolation").Scan(&level))
			log("isolation %s", level)
			_, err = tx.ExecContext(ctx, "INSERT INTO items VALUES (2, 'b')")
			log("insert: %v", err)
			log("commit: %v", tx.Commit())
			var ids string
			log("read: %v", db.QueryRowContext(ctx, "SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM items").Scan(&ids))
			log("ids %q", ids)
		}},
		{"an error aborts the transaction, not the pool", func(t *testing.T, open func() *sql.DB, log func(string, ...any)) {
			db := open()
			_, _ = db.ExecContext(ctx, "DELETE FROM items")
			_, _ = db.ExecContext(ctx, "INSERT INTO items VALUES (1, 'a')")
			tx, err := db.BeginTx(ctx, nil)
			require.NoError(t, err)
			_, err = tx.ExecContext(ctx, "INSERT INTO items VALUES (1, 'dup')")
			log("duplicate: %s", sqlstate(err))
			_, err = tx.ExecContext(ctx, "SELECT 1")
			log("after: %s", sqlstate(err))
			log("rollback: %v", tx.Rollback())
			var n int
			log("pool: %v", db.QueryRowContext(ctx, "SELECT count(*) FROM items").Scan(&n))
			log("rows %d", n)
		}},
		{"a cancelled query fails and the pool goes on", func(t *testing.T, open func() *sql.DB, log func(string, ...any)) {
			db := open()
			short, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
			_, err := db.ExecContext(short, "SELECT pg_sleep(5)")
			cancel()
			log("cancelled: deadline %v", errors.Is(err, context.DeadlineExceeded) || sqlstate(err) == "57014")
			var n int
			log("next: %v", db.QueryRowContext(ctx, "SELECT 41 + 1").Scan(&n))
			log("n %d", n)
		}},
		{"a prepared statement from many goroutines", func(t *testing.T, open func() *sql.DB, log func(string, ...any)) {
			db := open()
			st, err := db.PrepareContext(ctx, "SELECT $1::int * 2")
			require.NoError(t, err)
			defer st.Close()
			var wg sync.WaitGroup
			sums := make([]int, 8)
			for g := range sums {
				wg.Go(func() {
					for i := range 20 {
						var n int
						if err := st.QueryRowContext(ctx, i).Scan(&n); err == nil {
							sums[g] += n
						}
					}
				})
			}
			wg.Wait()
			log("sums %v", sums)
			_, err = db.PrepareContext(ctx, "SELECT FROM no_such_table")
			log("bad prepare: %s", sqlstate(err))
		}},
		{"two pools of one DSN are two sessions", func(t *testing.T, open func() *sql.DB, log func(string, ...any)) {
			a, b := open(), open()
			ca, err := a.Conn(ctx)
			require.NoError(t, err)
			defer ca.Close()
			var got bool
			log("lock: %v", ca.QueryRowContext(ctx, "SELECT pg_try_advisory_lock(4242)").Scan(&got))
			log("a locked %v", got)
			log("try: %v", b.QueryRowContext(ctx, "SELECT pg_try_advisory_lock(4242)").Scan(&got))
			log("b locked %v", got)
			_, err = a.ExecContext(ctx, "SET search_path = nowhere")
			log("set on a: %v", err)
			var path string
			log("b path: %v", b.QueryRowContext(ctx, "SHOW search_path").Scan(&path))
			log("b search_path %s", path)
			_, _ = ca.ExecContext(ctx, "SELECT pg_advisory_unlock(4242)")
		}},
		{"Raw gives the pgx connection of the session", func(t *testing.T, open func() *sql.DB, log func(string, ...any)) {
			db := open()
			c, err := db.Conn(ctx)
			require.NoError(t, err)
			defer c.Close()
			_, err = c.ExecContext(ctx, "SET application_name = 'raw'")
			require.NoError(t, err)
			log("raw: %v", c.Raw(func(dc any) error {
				var pc *pgx.Conn
				switch x := dc.(type) {
				case interface{ Conn() *pgx.Conn }: // pgx stdlib
					pc = x.Conn()
				default:
					var err error
					if pc, err = PgxConn(dc); err != nil {
						return err
					}
				}
				var name string
				if err := pc.QueryRow(ctx, "SELECT current_setting('application_name')").Scan(&name); err != nil {
					return err
				}
				log("raw sees %s", name)
				return nil
			}))
		}},
		{"a *sql.Conn outlives its closed *sql.DB", func(t *testing.T, open func() *sql.DB, log func(string, ...any)) {
			db := open()
			c, err := db.Conn(ctx)
			require.NoError(t, err)
			log("first: %v", c.PingContext(ctx))
			log("close db: %v", db.Close())
			var n int
			log("conn after: %v", c.QueryRowContext(ctx, "SELECT 7").Scan(&n))
			log("close conn: %v", c.Close())
			log("db after: %v", db.QueryRowContext(ctx, "SELECT 1").Scan(&n))
		}},
	}
	drivers := []struct {
		name string
		open func(t *testing.T) *sql.DB
	}{
		{"pgx", func(t *testing.T) *sql.DB {
			db, err := sql.Open("pgx", e.dsn(0))
			require.NoError(t, err)
			db.SetMaxOpenConns(3)
			t.Cleanup(func() { db.Close() })
			return db
		}},
		{"tenantpg", func(t *testing.T) *sql.DB {
			db, err := e.drv.OpenDB(e.dsn(0))
			require.NoError(t, err)
			t.Cleanup(func() { db.Close() })
			return db
		}},
	}
	for _, p := range programs {
		t.Run(p.name, func(t *testing.T) {
			transcripts := make([]string, len(drivers))
			for i, d := range drivers {
				var sb strings.Builder
				t.Run(d.name, func(t *testing.T) {
					p.run(t, func() *sql.DB { return d.open(t) }, func(format string, args ...any) {
						fmt.Fprintf(&sb, format+"\n", args...)
					})
				})
				transcripts[i] = sb.String()
			}
			require.Equal(t, transcripts[0], transcripts[1], "tenantpg must behave as pgx's stdlib")
		})
	}
	e.requireQuiescent()
}

func sqlstate(err error) string {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return pgErr.Code
	}
	if err != nil {
		return "error"
	}
	return "ok"
}
