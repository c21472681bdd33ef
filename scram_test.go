package tenantpg

import (
	"context"
	"crypto/hmac"
	"crypto/pbkdf2"
	"crypto/sha256"
	"database/sql"
	"encoding/base64"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/stretchr/testify/require"

	"github.com/tenantpg/tenantpg/internal/pgtest"
)

// The key cache against the test server, which checks every TCP login with
// scram-sha-256 (4096 iterations).

// openAs opens database 0 of e as its role with password pw.
func (e *env) openAs(pw string, params ...string) *sql.DB {
	e.t.Helper()
	dsn := e.srv.URL(e.role, pw, e.dbs[0]) + "&workspace=ws0"
	for _, p := range params {
		dsn += "&" + p
	}
	db, err := e.drv.OpenDB(dsn)
	require.NoError(e.t, err)
	e.t.Cleanup(func() { db.Close() })
	return db
}

func (e *env) alterPassword(pw string) {
	e.t.Helper()
	_, err := e.srv.Admin().ExecContext(context.Background(),
		fmt.Sprintf("ALTER ROLE %s PASSWORD '%s'", pgtest.QuoteIdent(e.role), strings.ReplaceAll(pw, "'", "''")))
	require.NoError(e.t, err)
}

func requireLoginRefused(t *testing.T, err error, secrets ...string) {
	t.Helper()
	var pgErr *pgconn.PgError
	require.ErrorAs(t, err, &pgErr)
	require.Equal(t, "28P01", pgErr.Code, "invalid_password")
	for _, s := range secrets {
		require.NotContains(t, err.Error(), s)
	}
}

func TestScramKeyCacheRealServer(t *testing.T) {
	e := newEnv(t, 1, Config{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// Two pools: each dials its own backend, the second with the keys the
	// first derived.
	require.NoError(t, e.open(0).PingContext(ctx))
	require.Equal(t, uint64(1), e.drv.scram.derivations.Load())
	require.NoError(t, e.open(0).PingContext(ctx))
	require.Equal(t, uint64(1), e.drv.scram.derivations.Load(), "the second dial ran no PBKDF2")
	require.Equal(t, 2, e.backends())

	// Off: pgx's own exchange, and the keys are dropped.
	cfg := Config{DisableScramKeyCache: true}
	require.NoError(t, e.drv.Configure(cfg))
	require.NoError(t, e.open(0).PingContext(ctx))
	require.Equal(t, uint64(1), e.drv.scram.derivations.Load())
	cfg.DisableScramKeyCache = false
	require.NoError(t, e.drv.Configure(cfg))
	require.NoError(t, e.open(0).PingContext(ctx))
	require.Equal(t, uint64(2), e.drv.scram.derivations.Load(), "turning the cache off dropped the keys")
	require.Equal(t, 4, e.backends())
}

func TestScramKeyCacheWrongPassword(t *testing.T) {
	e := newEnv(t, 1, Config{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	wrong := "wrong-" + testPassword
	for range 2 { // derived, then cached: refused alike
		requireLoginRefused(t, e.openAs(wrong).PingContext(ctx), wrong, testPassword)
	}
	require.Equal(t, uint64(1), e.drv.scram.derivations.Load())
	require.NoError(t, e.openAs(testPassword).PingContext(ctx), "a wrong password's keys do not stand in the way of the right one")
}

// A password change while the cache holds the old keys: the keys are named
// by password, salt and iteration count, and ALTER ROLE draws a new salt,
// so the next dial derives again. No cached key can lock a role out: each
// is what a fresh derivation would give.
func TestScramKeyCachePasswordChange(t *testing.T) {
	e := newEnv(t, 1, Config{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	derivations := func() uint64 { return e.drv.scram.derivations.Load() }

	require.NoError(t, e.openAs(testPassword).PingContext(ctx))
	require.Equal(t, uint64(1), derivations())

	const second = "second-Pa55w0rd"
	e.alterPassword(second)
	requireLoginRefused(t, e.openAs(testPassword).PingContext(ctx), testPassword, second)
	require.Equal(t, uint64(2), derivations(), "the new salt missed the cache")
	require.NoError(t, e.openAs(second).PingContext(ctx))
	require.NoError(t, e.openAs(second).PingContext(ctx))
	require.Equal(t, uint64(3), derivations())

	// A verifier for a third password under the same salt and count as the
	// cached keys of the second (as a hand-set verifier could be): only
	// the password tells the two apart, and it is part of the keys' name.
	var verifier string
	require.NoError(t, e.srv.Admin().QueryRowContext(ctx, "SELECT rolpassword FROM pg_authid WHERE rolname = $1", e.role).Scan(&verifier))
	salt, iterations := parseVerifier(t, verifier)
	const third = "third-Pa55w0rd"
	e.alterPassword(scramVerifier(third, salt, iterations))
	requireLoginRefused(t, e.openAs(second).PingContext(ctx), second, third)
	require.Equal(t, uint64(3), derivations(), "the second password's keys were cached, and refused")
	require.NoError(t, e.openAs(third).PingContext(ctx))
	require.Equal(t, uint64(4), derivations())
}

// parseVerifier reads the salt and iteration count of a stored verifier,
// SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>.
func parseVerifier(t *testing.T, v string) ([]byte, int) {
	t.Helper()
	rest, ok := strings.CutPrefix(v, "SCRAM-SHA-256$")
	require.True(t, ok, "not a SCRAM verifier")
	params, _, ok := strings.Cut(rest, "$")
	require.True(t, ok)
	iter, saltB64, ok := strings.Cut(params, ":")
	require.True(t, ok)
	n, err := strconv.Atoi(iter)
	require.NoError(t, err)
	salt, err := base64.StdEncoding.DecodeString(saltB64)
	require.NoError(t, err)
	return salt, n
}

// scramVerifier builds the verifier PostgreSQL stores for password, from
// RFC 5802 directly rather than through scram.go.
func scramVerifier(password string, salt []byte, iterations int) string {
	salted, _ := pbkdf2.Key(sha256.New, password, salt, iterations, 32)
	mac := func(msg string) []byte {
		m := hmac.New(sha256.New, salted)
		m.Write([]byte(msg))
		return m.Sum(nil)
	}
	stored := sha256.Sum256(mac("Client Key"))
	b64 := base64.StdEncoding.EncodeToString
	return fmt.Sprintf("SCRAM-SHA-256$%d:%s$%s:%s", iterations, b64(salt), b64(stored[:]), b64(mac("Server Key")))
}

// Dials that pgx must see authenticate, and passwords that SASLprep could
// change, keep pgx's own exchange.
func TestScramKeyCacheStepsAside(t *testing.T) {
	e := newEnv(t, 1, Config{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	require.NoError(t, e.open(0, "require_auth=scram-sha-256").PingContext(ctx))
	// Without TLS pgx refuses channel_binding=require itself.
	require.ErrorContains(t, e.open(0, "channel_binding=require").PingContext(ctx), "channel binding required")
	const nonASCII = "pässwörd\u00a0Ωmega"
	e.alterPassword(nonASCII)
	require.NoError(t, e.openAs(nonASCII).PingContext(ctx))
	require.Zero(t, e.drv.scram.derivations.Load())
}

// Concurrent first dials of one role derive its keys once: the first
// derives, the others wait for it.
func TestScramKeyCacheConcurrentFirstDials(t *testing.T) {
	e := newEnv(t, 1, Config{})
	cfg, err := pgconn.ParseConfig(e.dsn(0))
	require.NoError(t, err)
	cache := newScramCache()
	cfg.AfterNetConnect = cache.hook(nil)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	const dials = 16
	start := make(chan struct{})
	conns := make([]*pgconn.PgConn, dials)
	errs := make([]error, dials)
	var wg sync.WaitGroup
	for i := range dials {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			conns[i], errs[i] = pgconn.ConnectConfig(ctx, cfg.Copy())
		}()
	}
	close(start)
	wg.Wait()
	for i := range dials {
		require.NoError(t, errs[i])
		require.NoError(t, conns[i].Exec(ctx, "SELECT 1").Close())
		require.NoError(t, conns[i].Close(ctx))
	}
	require.Equal(t, uint64(1), cache.derivations.Load())
}
