package graceful

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"time"
)

// Commands understood by the control socket ([Options.ControlSocket]).
const (
	// ControlUpgrade runs [Process.Upgrade] and answers with its outcome once
	// the new process is ready or the attempt has failed.
	ControlUpgrade = "upgrade"
	// ControlStatus answers with the serving process's PID and state.
	ControlStatus = "status"
)

// controlRequestTimeout bounds how long a peer may take to send its
// one-line request; maxControlRequest bounds its length.
const (
	controlRequestTimeout = 5 * time.Second
	maxControlRequest     = 256
)

// Control sends command ([ControlUpgrade] or [ControlStatus]) to the
// control socket at path and waits for the answer, at most until ctx ends.
// It returns the answer's text, or an error carrying the reason the process
// gave: for an upgrade, why it failed. The process keeps serving either way.
func Control(ctx context.Context, path, command string) (string, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return "", fmt.Errorf("graceful: control socket: %w", err)
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })
	defer stop()
	// A refusal may arrive before the request is read: still read it.
	_, werr := io.WriteString(conn, command+"\n")
	line, err := bufio.NewReader(io.LimitReader(conn, 64<<10)).ReadString('\n')
	if err != nil {
		if werr != nil {
			err = werr
		} else if ctx.Err() != nil {
			err = ctx.Err()
		} else if errors.Is(err, io.EOF) {
			err = errors.New("the process closed the connection without an answer (did it exit?)")
		}
		return "", fmt.Errorf("graceful: control socket: %s: %w", command, err)
	}
	line = strings.TrimSuffix(line, "\n")
	if msg, ok := strings.CutPrefix(line, "ok "); ok {
		return msg, nil
	}
	if msg, ok := strings.CutPrefix(line, "error "); ok {
		return "", errors.New(msg)
	}
	return "", fmt.Errorf("graceful: control socket: malformed answer %q", line)
}

// listenControl opens the control socket (inherited across upgrades like
// any listener) and serves it like a ServeConns server: one-line requests,
// answered only to a peer with this process's user ID.
func (p *Process) listenControl(path string) error {
	ln, err := p.listen("unix", path)
	if err != nil {
		return fmt.Errorf("graceful: control socket %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return fmt.Errorf("graceful: control socket %s: %w", path, err)
	}
	p.ServeConns(ln, p.handleControl, nil)
	return nil
}

func (p *Process) handleControl(conn net.Conn) {
	log := p.log.With("control", true)
	reply := func(ok bool, msg string) {
		word := "error "
		if ok {
			word = "ok "
		}
		conn.SetWriteDeadline(time.Now().Add(controlRequestTimeout))
		io.WriteString(conn, word+strings.ReplaceAll(msg, "\n", " ")+"\n")
		if !ok {
			// Closing with unread input would reset the connection and
			// lose the answer: read what the peer still sends, briefly.
			if cw, ok := conn.(interface{ CloseWrite() error }); ok {
				cw.CloseWrite()
			}
			conn.SetReadDeadline(time.Now().Add(time.Second))
			io.Copy(io.Discard, io.LimitReader(conn, 64<<10))
		}
	}
	uid, pid, err := peerCred(conn)
	if err != nil {
		log.Warn("control socket: refused a peer", "err", err)
		reply(false, "graceful: control socket: "+err.Error())
		return
	}
	if owner := os.Geteuid(); uid != owner {
		log.Warn("control socket: refused a peer that is not the owner", "peer_uid", uid, "peer_pid", pid)
		reply(false, fmt.Sprintf("graceful: control socket: permission denied: peer uid %d is not the owner (uid %d)", uid, owner))
		return
	}
	conn.SetReadDeadline(time.Now().Add(controlRequestTimeout))
	line, err := bufio.NewReader(io.LimitReader(conn, maxControlRequest+1)).ReadString('\n')
	if err != nil {
		msg := "graceful: control socket: no request line: " + err.Error()
		if len(line) > maxControlRequest {
			msg = fmt.Sprintf("graceful: control socket: request longer than %d bytes", maxControlRequest)
		}
		log.Warn("control socket: bad request", "peer_pid", pid, "err", msg)
		reply(false, msg)
		return
	}
	conn.SetReadDeadline(time.Time{})
	cmd := strings.TrimSpace(line)
	switch cmd {
	case ControlUpgrade:
		log.Info("control socket: upgrade requested", "peer_pid", pid)
		start := time.Now()
		if err := p.Upgrade(context.Background()); err != nil {
			reply(false, err.Error())
			return
		}
		took := time.Since(start).Round(time.Millisecond)
		if succ := p.successorPID(); succ != 0 {
			reply(true, fmt.Sprintf("upgraded: pid %d ready after %v; pid %d draining", succ, took, os.Getpid()))
		} else {
			reply(true, fmt.Sprintf("upgraded: new process ready after %v; pid %d draining", took, os.Getpid()))
		}
	case ControlStatus:
		state := "starting"
		switch {
		case p.health.draining.Load():
			state = "draining"
		case p.upgrading.Load():
			state = "upgrading"
		case p.health.ready.Load():
			state = "serving"
		}
		reply(true, "pid "+strconv.Itoa(os.Getpid())+" "+state)
	default:
		log.Warn("control socket: unknown command", "peer_pid", pid, "command", strconv.Quote(cmd))
		reply(false, fmt.Sprintf("graceful: control socket: unknown command %q (want %q or %q)", cmd, ControlUpgrade, ControlStatus))
	}
}
