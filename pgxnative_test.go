package tenantpg

import (
	"context"
	"database/sql"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"
)

// rawPgx runs f with the *pgx.Conn of a pinned connection of db.
func rawPgx(t *testing.T, db *sql.DB, f func(*pgx.Conn) error) {
	t.Helper()
	c, err := db.Conn(context.Background())
	require.NoError(t, err)
	defer c.Close()
	require.NoError(t, c.Raw(func(dc any) error {
		pc, err := PgxConn(dc)
		if err != nil {
			return err
		}
		return f(pc)
	}))
}

func TestPgxBatch(t *testing.T) {
	e := newEnv(t, 1, Config{MaxConnections: 2})
	db := e.open(0)
	ctx := context.Background()
	rawPgx(t, db, func(pc *pgx.Conn) error {
		b := &pgx.Batch{}
		for i := 1; i <= 10; i++ {
			b.Queue("SELECT v FROM kv WHERE id = $1", i)
		}
		b.Queue("UPDATE kv SET v = 'batched' WHERE id = 10")
		res := pc.SendBatch(ctx, b)
		for i := 1; i <= 10; i++ {
			var v string
			require.NoError(t, res.QueryRow().Scan(&v))
			require.Equal(t, "v"+itoa(i), v)
		}
		tag, err := res.Exec()
		require.NoError(t, err)
		require.Equal(t, int64(1), tag.RowsAffected())
		return res.Close()
	})
	var v string
	require.NoError(t, db.QueryRowContext(ctx, "SELECT v FROM kv WHERE id = 10").Scan(&v))
	require.Equal(t, "batched", v)
	e.requireQuiescent()
}

// TestListenNotify listens on a pinned connection while another workspace
// competes for the only other token: the listening connection is never
// evicted, and the notification arrives.
func TestListenNotify(t *testing.T) {
	e := newEnv(t, 3, Config{MaxConnections: 2, MaxConnectionsPerDB: 1, AcquireTimeout: 5 * time.Second})
	listener, other := e.open(0), e.open(2)
	other.SetMaxIdleConns(0)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	rawPgx(t, listener, func(pc *pgx.Conn) error {
		if _, err := pc.Exec(ctx, "LISTEN contacts_changed"); err != nil {
			return err
		}
		queryOne(t, other) // takes the second token and gives it back
		// NOTIFY is per database: send it from the listener's own database
		// through a pool of its own, which takes the idle backend's token
		// (the listener's database is at its cap of 1, but that cap is the
		// listener's pool's).
		sender, err := e.drv.OpenDB(e.dsn(0, "workspace=sender"))
		require.NoError(t, err)
		defer sender.Close()
		_, err = sender.ExecContext(ctx, "SELECT pg_notify('contacts_changed', 'contact 42')")
		require.NoError(t, err)
		n, err := pc.WaitForNotification(ctx)
		if err != nil {
			return err
		}
		require.Equal(t, "contacts_changed", n.Channel)
		require.Equal(t, "contact 42", n.Payload)
		return nil
	})
	require.Zero(t, dbStats(e.drv.Stats(), "ws0").Evictions, "the listening connection was never evicted")
	e.requireQuiescent()
}

func itoa(i int) string { return strconv.Itoa(i) }
