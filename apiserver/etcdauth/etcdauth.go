// Package etcdauth manages the users and roles of a mesh API server's
// etcd. It is the one place outside kvstore that holds etcd's client API,
// and it holds only its auth part (kvstore.Client.Auth).
//
// Design notes. etcd started with --client-cert-auth takes the user of a
// request from the common name of the client certificate's verified leaf
// (auth.AuthInfoFromTLS), but only once auth is enabled; before that every
// certificate the CA signed may do anything. So the order is: users and
// roles first, AuthEnable last. A failure half way leaves auth disabled
// and the next start completes the job.
//
// After the first start, only the root user may change users and roles, so
// the API server connects with a client certificate whose CN is RootUser.
// Every user here has no password (etcd's NoPassword option): a password
// would be a second credential to leak, and a no-password user cannot log
// in with one at all.
//
// Roles converge: Ensure* grants what is missing and revokes what is not
// wanted, so a permission an operator added by hand to the remote reader
// role does not survive the next start.
//
// Users:
//
//	root                 role root (built in): everything, including auth.
//	trellis-writer       role trellis-writer: readwrite on trellis/.
//	trellis-remote       role trellis-remote-reader: read on trellis/v1/.
//
// trellis-remote is the etcd front door's identity: every remote cluster
// reads through the door (apiserver/frontdoor), which checks the remote's
// own certificate and forwards as this one user, since every remote
// cluster has the same rights. Per-remote users (remote-<cluster>, from
// before the door) are deleted by Ensure: a remote's certificate names no
// etcd user any more, so presenting it to etcd directly gets nothing.
//
// The writer's prefix is trellis/ rather than trellis/v1/ so that it can
// also use keys beside the versioned tree (a future trellis/v2/, the
// kvstore health probe trellis/health).
package etcdauth

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	apiv1 "github.com/trellis-mesh/trellis/api/v1"
)

// etcd users and roles the API server manages.
const (
	// RootUser is etcd's superuser; the API server's admin client
	// certificate carries it as CN.
	RootUser = "root"
	// rootRole is etcd's built-in all-powerful role.
	rootRole = "root"

	// LocalWriterUser is the user the local API server writes as.
	LocalWriterUser = "trellis-writer"
	// LocalWriterRole may read and write everything under WriterPrefix.
	LocalWriterRole = "trellis-writer"
	// WriterPrefix is the key prefix LocalWriterRole owns.
	WriterPrefix = "trellis/"

	// RemoteReaderRole may read apiv1.Prefix and nothing else.
	RemoteReaderRole = "trellis-remote-reader"
	// RemoteReaderUser is the one user every remote cluster reads as,
	// through the etcd front door; it has RemoteReaderRole.
	RemoteReaderUser = "trellis-remote"

	// legacyRemoteUserPrefix is the prefix of the per-remote users of
	// before the front door, which Ensure deletes.
	legacyRemoteUserPrefix = "remote-"
)

// rolePermission is the one permission a managed role holds.
type rolePermission struct {
	prefix string
	perm   clientv3.PermissionType
}

func (p rolePermission) String() string {
	return fmt.Sprintf("%s on prefix %q", permName(p.perm), p.prefix)
}

func permName(p clientv3.PermissionType) string {
	switch p {
	case clientv3.PermissionType(clientv3.PermRead):
		return "read"
	case clientv3.PermissionType(clientv3.PermWrite):
		return "write"
	case clientv3.PermissionType(clientv3.PermReadWrite):
		return "readwrite"
	}
	return fmt.Sprintf("permission(%d)", p)
}

// Ensure creates the root user, the local writer user and role, and the
// remote reader user and role, deletes leftover per-remote users, then
// enables auth. It is idempotent and converges the roles' permissions. On
// first start cli may be any client (auth is off); once auth is on, cli
// must authenticate as RootUser, i.e. use a client certificate with CN
// "root".
func Ensure(ctx context.Context, cli clientv3.Auth) error {
	st, err := cli.AuthStatus(ctx)
	if err != nil {
		return fmt.Errorf("etcdauth: etcd auth status: %w", err)
	}
	users, err := listUsers(ctx, cli, st.Enabled)
	if err != nil {
		return err
	}
	if err := ensureUser(ctx, cli, users, RootUser, rootRole); err != nil {
		return err
	}
	if err := ensureRole(ctx, cli, LocalWriterRole, rolePermission{WriterPrefix, clientv3.PermissionType(clientv3.PermReadWrite)}); err != nil {
		return err
	}
	if err := ensureUser(ctx, cli, users, LocalWriterUser, LocalWriterRole); err != nil {
		return err
	}
	if err := ensureRole(ctx, cli, RemoteReaderRole, rolePermission{apiv1.Prefix, clientv3.PermissionType(clientv3.PermRead)}); err != nil {
		return err
	}
	if err := ensureUser(ctx, cli, users, RemoteReaderUser, RemoteReaderRole); err != nil {
		return err
	}
	for _, u := range users {
		if !strings.HasPrefix(u, legacyRemoteUserPrefix) {
			continue
		}
		if _, err := cli.UserDelete(ctx, u); err != nil && !errors.Is(err, rpctypes.ErrUserNotFound) {
			return fmt.Errorf("etcdauth: delete leftover etcd user %s: %w", u, adminHint(err))
		}
		slog.InfoContext(ctx, "deleted a per-remote etcd user from before the etcd front door", "user", u)
	}
	if st.Enabled {
		return nil
	}
	if _, err := cli.AuthEnable(ctx); err != nil {
		return fmt.Errorf("etcdauth: enable etcd auth: %w", err)
	}
	slog.InfoContext(ctx, "enabled etcd auth; from now on connect as root with the root client certificate",
		"rootUser", RootUser, "writerUser", LocalWriterUser, "remoteReaderUser", RemoteReaderUser)
	return nil
}

// listUsers returns the existing users. Listing needs admin rights once
// auth is on, so it doubles as the check that cli is root, giving a clear
// error instead of a confusing one from a later step.
func listUsers(ctx context.Context, cli clientv3.Auth, authEnabled bool) ([]string, error) {
	resp, err := cli.UserList(ctx)
	if err != nil {
		if authEnabled {
			err = adminHint(err)
		}
		return nil, fmt.Errorf("etcdauth: list etcd users: %w", err)
	}
	return resp.Users, nil
}

// adminHint explains the errors etcd gives a client that is not root.
func adminHint(err error) error {
	switch {
	case errors.Is(err, rpctypes.ErrPermissionDenied),
		errors.Is(err, rpctypes.ErrUserEmpty),
		errors.Is(err, rpctypes.ErrUserNotFound):
		return fmt.Errorf("%w (etcd auth is enabled: connect with the client certificate whose CN is %q)", err, RootUser)
	}
	return err
}

// ensureUser creates user (no password) when it is not in users and makes
// role its only role.
func ensureUser(ctx context.Context, cli clientv3.Auth, users []string, user, role string) error {
	if !slices.Contains(users, user) {
		_, err := cli.UserAddWithOptions(ctx, user, "", &clientv3.UserAddOptions{NoPassword: true})
		if err != nil && !errors.Is(err, rpctypes.ErrUserAlreadyExist) {
			return fmt.Errorf("etcdauth: add etcd user %s: %w", user, adminHint(err))
		}
	}
	resp, err := cli.UserGet(ctx, user)
	if err != nil {
		return fmt.Errorf("etcdauth: get etcd user %s: %w", user, adminHint(err))
	}
	if !slices.Contains(resp.Roles, role) {
		if _, err := cli.UserGrantRole(ctx, user, role); err != nil {
			return fmt.Errorf("etcdauth: grant etcd role %s to user %s: %w", role, user, adminHint(err))
		}
	}
	for _, r := range resp.Roles {
		if r == role {
			continue
		}
		if _, err := cli.UserRevokeRole(ctx, user, r); err != nil && !errors.Is(err, rpctypes.ErrRoleNotGranted) {
			return fmt.Errorf("etcdauth: revoke unexpected etcd role %s from user %s: %w", r, user, adminHint(err))
		}
		slog.WarnContext(ctx, "revoked an unexpected etcd role", "user", user, "role", r)
	}
	return nil
}

// ensureRole creates role when missing and makes want its only permission.
func ensureRole(ctx context.Context, cli clientv3.Auth, role string, want rolePermission) error {
	resp, err := cli.RoleGet(ctx, role)
	if errors.Is(err, rpctypes.ErrRoleNotFound) {
		if _, err := cli.RoleAdd(ctx, role); err != nil && !errors.Is(err, rpctypes.ErrRoleAlreadyExist) {
			return fmt.Errorf("etcdauth: add etcd role %s: %w", role, adminHint(err))
		}
		resp, err = cli.RoleGet(ctx, role)
	}
	if err != nil {
		return fmt.Errorf("etcdauth: get etcd role %s: %w", role, adminHint(err))
	}
	wantEnd := clientv3.GetPrefixRangeEnd(want.prefix)
	have := false
	// Grant before revoking, so a role being repaired never passes through
	// a state with less access than it should have.
	for _, p := range resp.Perm {
		if string(p.Key) == want.prefix && string(p.RangeEnd) == wantEnd && clientv3.PermissionType(p.PermType) == want.perm {
			have = true
		}
	}
	if !have {
		if _, err := cli.RoleGrantPermission(ctx, role, want.prefix, wantEnd, want.perm); err != nil {
			return fmt.Errorf("etcdauth: grant %s to etcd role %s: %w", want, role, adminHint(err))
		}
	}
	for _, p := range resp.Perm {
		key, end := string(p.Key), string(p.RangeEnd)
		if key == want.prefix && end == wantEnd {
			continue // the wanted range: granted (or its type updated) above
		}
		if _, err := cli.RoleRevokePermission(ctx, role, key, end); err != nil && !errors.Is(err, rpctypes.ErrPermissionNotGranted) {
			return fmt.Errorf("etcdauth: revoke unexpected permission [%q, %q) from etcd role %s: %w", key, end, role, adminHint(err))
		}
		slog.WarnContext(ctx, "revoked an unexpected etcd permission", "role", role,
			"key", key, "rangeEnd", end, "perm", permName(clientv3.PermissionType(p.PermType)))
	}
	return nil
}
