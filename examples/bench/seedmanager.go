package main

// A REIMPLEMENTATION, FROM ITS DESCRIPTION, of the application-level
// connection manager that tenantpg generalizes: the "ConnectionManager" of
// shared/seed-connection-manager.md. The seed's code itself is not in this
// repository; what follows is written from the document's description and
// its excerpts (GetWorkspaceConnection with its numbered steps,
// closeLRUIdlePools, the capacity check), keeping the behaviours that
// matter for the comparison:
//
//   - a map of *sql.DB, one small pool (3 connections) per workspace;
//   - admission when a pool is created, by counting the open connections of
//     all pools against the maximum; a pool admitted with one connection
//     may grow to three later without another check;
//   - when there is no capacity, one idle pool (InUse == 0, at least one
//     open connection) chosen by sorting all pools' access times is
//     closed, and the request fails with a connection-limit error (the
//     seed's HTTP 503) if that did not make room;
//   - a ping of the pool on every get, and pool creation (ping plus
//     "SELECT 1") under the write lock.
//
// The seed also keeps a system database with 10 connections; the benchmark
// has none, so the whole budget goes to workspaces. Its lifetime (10m) and
// idle time (5m) settings are kept; they do not fire within a run.

import (
	"context"
	"database/sql"
	"fmt"
	"sort"
	"sync"
	"time"
)

// seedLimitError is the seed's ConnectionLimitError: no capacity for a new
// workspace pool even after trying to close an idle one.
type seedLimitError struct{ open, max int }

func (e *seedLimitError) Error() string {
	return fmt.Sprintf("connection limit reached: %d/%d connections in use", e.open, e.max)
}

type seedManager struct {
	mu                  sync.RWMutex
	workspacePools      map[string]*sql.DB
	poolAccessTimes     map[string]time.Time
	maxConnections      int
	maxConnectionsPerDB int
	dsn                 func(workspaceID string) string
}

func newSeedManager(maxConnections, maxConnectionsPerDB int, dsn func(string) string) *seedManager {
	return &seedManager{
		workspacePools:      make(map[string]*sql.DB),
		poolAccessTimes:     make(map[string]time.Time),
		maxConnections:      maxConnections,
		maxConnectionsPerDB: maxConnectionsPerDB,
		dsn:                 dsn,
	}
}

// GetWorkspaceConnection follows the seed's numbered steps.
func (cm *seedManager) GetWorkspaceConnection(ctx context.Context, workspaceID string) (*sql.DB, error) {
	// 1. Check context not cancelled.
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	// 2. Check for an existing pool.
	cm.mu.RLock()
	pool, ok := cm.workspacePools[workspaceID]
	cm.mu.RUnlock()
	if ok {
		// 3. Verify the pool is healthy: a round trip on every get.
		if err := pool.PingContext(ctx); err == nil {
			// 4. Double-check the pool still exists.
			cm.mu.RLock()
			stillExists := cm.workspacePools[workspaceID] == pool
			cm.mu.RUnlock()
			if stillExists {
				// 5. Update the access time.
				cm.mu.Lock()
				cm.poolAccessTimes[workspaceID] = time.Now()
				cm.mu.Unlock()
				return pool, nil
			}
		}
		// 6. The pool is stale (or its ping failed): remove it.
		cm.mu.Lock()
		if cm.workspacePools[workspaceID] == pool {
			delete(cm.workspacePools, workspaceID)
			delete(cm.poolAccessTimes, workspaceID)
			pool.Close()
		}
		cm.mu.Unlock()
	}
	// 7. Check the context again before the expensive part.
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	// 8. Create a new pool, under the write lock for the whole creation.
	cm.mu.Lock()
	defer cm.mu.Unlock()
	// 9. Double-check after acquiring the write lock.
	if pool, ok := cm.workspacePools[workspaceID]; ok {
		cm.poolAccessTimes[workspaceID] = time.Now()
		return pool, nil
	}
	// 10. Check capacity; try LRU eviction if needed.
	if !cm.hasCapacityForNewPool() {
		if cm.closeLRUIdlePools(1) == 0 || !cm.hasCapacityForNewPool() {
			return nil, &seedLimitError{open: cm.getTotalConnectionCount(), max: cm.maxConnections}
		}
	}
	// 11. Create the pool.
	pool, err := cm.createWorkspacePool(ctx, workspaceID)
	if err != nil {
		return nil, err
	}
	// 12. Store it with its access time.
	cm.workspacePools[workspaceID] = pool
	cm.poolAccessTimes[workspaceID] = time.Now()
	return pool, nil
}

// getTotalConnectionCount adds up the open connections of every pool, as
// database/sql counts them.
func (cm *seedManager) getTotalConnectionCount() int {
	total := 0
	for _, pool := range cm.workspacePools {
		total += pool.Stats().OpenConnections
	}
	return total
}

// hasCapacityForNewPool admits a pool if a full one (maxConnectionsPerDB)
// still fits beside the connections open now.
func (cm *seedManager) hasCapacityForNewPool() bool {
	return cm.getTotalConnectionCount()+cm.maxConnectionsPerDB <= cm.maxConnections
}

// closeLRUIdlePools closes up to count idle pools, oldest access first, and
// returns how many it closed. Caller holds the write lock.
func (cm *seedManager) closeLRUIdlePools(count int) int {
	type candidate struct {
		workspaceID string
		lastAccess  time.Time
	}
	var candidates []candidate
	for workspaceID, pool := range cm.workspacePools {
		stats := pool.Stats()
		if stats.InUse == 0 && stats.OpenConnections > 0 {
			candidates = append(candidates, candidate{workspaceID: workspaceID, lastAccess: cm.poolAccessTimes[workspaceID]})
		}
	}
	if len(candidates) == 0 {
		return 0
	}
	sort.Slice(candidates, func(i, j int) bool { return candidates[i].lastAccess.Before(candidates[j].lastAccess) })
	closed := 0
	for i := 0; i < len(candidates) && i < count; i++ {
		workspaceID := candidates[i].workspaceID
		if pool, ok := cm.workspacePools[workspaceID]; ok {
			pool.Close()
			delete(cm.workspacePools, workspaceID)
			delete(cm.poolAccessTimes, workspaceID)
			closed++
		}
	}
	return closed
}

// createWorkspacePool opens a pool of maxConnectionsPerDB, pings it and
// verifies it with a test query, as the seed's fixed version does. Errors
// name the workspace, never the DSN.
func (cm *seedManager) createWorkspacePool(ctx context.Context, workspaceID string) (*sql.DB, error) {
	db, err := sql.Open("pgx", cm.dsn(workspaceID))
	if err != nil {
		return nil, fmt.Errorf("failed to open connection to workspace %s: %w", workspaceID, err)
	}
	db.SetMaxOpenConns(cm.maxConnectionsPerDB)
	db.SetMaxIdleConns(cm.maxConnectionsPerDB)
	db.SetConnMaxLifetime(10 * time.Minute)
	db.SetConnMaxIdleTime(5 * time.Minute)
	if err := db.PingContext(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("failed to connect to workspace %s database: %w", workspaceID, err)
	}
	var result int
	if err := db.QueryRowContext(ctx, "SELECT 1").Scan(&result); err != nil {
		db.Close()
		return nil, fmt.Errorf("failed to verify database access for workspace %s: %w", workspaceID, err)
	}
	return db, nil
}

// Close closes every pool.
func (cm *seedManager) Close() error {
	cm.mu.Lock()
	defer cm.mu.Unlock()
	for id, pool := range cm.workspacePools {
		pool.Close()
		delete(cm.workspacePools, id)
		delete(cm.poolAccessTimes, id)
	}
	return nil
}
