//go:build !unix

package tenantpg

// peerGone cannot peek without blocking on this platform; stdlib's ping
// after a second of idleness still catches a dead connection.
func (s *trackedConn) peerGone() bool { return false }
