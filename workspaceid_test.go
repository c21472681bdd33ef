package tenantpg

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// Ids cannot redirect a connection (#20, item 4).

// TestDatabaseNameOver63BytesRefused: PostgreSQL truncates a database name
// in the start-up packet to 63 bytes, so a 64-byte name reaches the
// database of the 63 bytes it starts with, another workspace's. Every path
// that takes a name refuses it, naming the workspace and never the DSN or
// its password: OpenDB, the resolver's DSN and the registry.
func TestDatabaseNameOver63BytesRefused(t *testing.T) {
	e := newEnv(t, 1, Config{MaxConnections: 2})
	ctx := context.Background()
	pad := maxIdentifierLen - len(e.srv.Prefix) - len("n63_")
	names, err := e.srv.CreateDatabases(ctx, e.role, "", "n63_"+strings.Repeat("x", pad))
	require.NoError(t, err)
	victim := names[0]
	require.Len(t, victim, maxIdentifierLen)
	long := victim + "y" // truncated by the server onto victim

	// At the limit: the name is used as is.
	db, err := e.drv.OpenDB(e.srv.URL(e.role, testPassword, victim))
	require.NoError(t, err)
	require.Equal(t, victim, currentDB(t, ctx, db))
	require.NoError(t, db.Close())

	refused := func(t *testing.T, err error, workspace string) {
		t.Helper()
		var de *DSNError
		require.ErrorAs(t, err, &de)
		require.Equal(t, workspace, de.Workspace)
		require.ErrorContains(t, err, "64 bytes")
		require.NotContains(t, err.Error(), testPassword)
		require.NotContains(t, err.Error(), "postgres://")
	}

	// OpenDB of a plain DSN.
	db, err = e.drv.OpenDB(e.srv.URL(e.role, testPassword, long) + "&workspace=wlong")
	if err == nil {
		t.Errorf("OpenDB accepted a 64-byte name; it reached database %q", currentDB(t, ctx, db))
		db.Close()
	} else {
		refused(t, err, "wlong")
	}

	// The resolver's DSN, under a {workspace} *sql.DB.
	require.NoError(t, e.drv.Configure(Config{MaxConnections: 2, ResolveWorkspace: func(_ context.Context, id string) (string, error) {
		if id == "legacy" {
			return e.srv.URL(e.role, testPassword, long), nil
		}
		return "", nil
	}}))
	routed := e.openRouted()
	var name string
	err = routed.QueryRowContext(WithWorkspace(ctx, "legacy"), "SELECT current_database()").Scan(&name)
	require.Error(t, err, "the resolver's 64-byte name reached database %q", name)
	refused(t, err, "legacy")

	// The registry, with a DSN callback.
	reg, err := NewWorkspaces(WorkspacesConfig{Driver: e.drv, DSN: func(id string) (string, error) {
		return e.srv.URL(e.role, testPassword, long), nil
	}})
	require.NoError(t, err)
	defer reg.Close()
	db, err = reg.DB(ctx, "wreg")
	if err == nil {
		t.Errorf("the registry accepted a 64-byte name; it reached database %q", currentDB(t, ctx, db))
	} else {
		refused(t, err, "wreg")
		require.ErrorContains(t, err, `workspace "wreg"`)
	}
	e.requireQuiescent()
}

// TestRoutedTemplateTooLongForAnyID: a {workspace} DSN whose name leaves no
// room for an id of one byte is refused when it is opened, not at each call.
func TestRoutedTemplateTooLongForAnyID(t *testing.T) {
	drv, err := NewDriver(Config{MaxConnections: 2})
	require.NoError(t, err)
	defer drv.Close()
	for _, n := range []int{maxIdentifierLen - 1, maxIdentifierLen} {
		dsn := fmt.Sprintf("postgres://app:%s@db.invalid/%s%s", testPassword, strings.Repeat("w", n), WorkspacePlaceholder)
		c, err := drv.OpenConnector(dsn)
		if n == maxIdentifierLen-1 {
			require.NoError(t, err, "room for a one-byte id")
			require.NoError(t, c.(*router).Close())
			continue
		}
		require.ErrorContains(t, err, "for any workspace")
		require.NotContains(t, err.Error(), testPassword)
		var de *DSNError
		require.True(t, errors.As(err, &de))
	}
}
