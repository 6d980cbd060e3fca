//go:build unix

package graceful

import (
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// This file holds systemd socket activation: the sockets passed with
// LISTEN_FDS on a fresh start, adopted by Listen and ListenPacket and then
// carried across upgrades like any other listener.

// maxActivated bounds LISTEN_FDS so a corrupt value cannot make us adopt
// arbitrary descriptors.
const maxActivated = 1024

// listenFdsStart is the first descriptor systemd passes (SD_LISTEN_FDS_START).
const listenFdsStart = 3

type activatedSocket struct {
	name string
	ln   net.Listener   // stream sockets
	pc   net.PacketConn // datagram sockets
}

func (a *activatedSocket) addr() net.Addr {
	if a.ln != nil {
		return a.ln.Addr()
	}
	return a.pc.LocalAddr()
}

func (a *activatedSocket) close() {
	if a.ln != nil {
		a.ln.Close()
	} else {
		a.pc.Close()
	}
}

// claim takes the activated socket whose name or address matches.
func (pl *platform) claim(network, addr string, stream bool) *activatedSocket {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	for i, a := range pl.activated {
		if (a.ln != nil) != stream {
			continue
		}
		if a.name == addr || sameAddr(network, addr, a.addr()) {
			pl.activated = append(pl.activated[:i], pl.activated[i+1:]...)
			return a
		}
	}
	return nil
}

// takeActivated adopts the sockets systemd passed with LISTEN_FDS, after
// checking every variable and descriptor: malformed input is an error and
// adopts nothing. The variables are removed so subprocesses do not see them.
func takeActivated() ([]*activatedSocket, error) {
	pidS, fdsS, namesS := os.Getenv("LISTEN_PID"), os.Getenv("LISTEN_FDS"), os.Getenv("LISTEN_FDNAMES")
	if pidS == "" && fdsS == "" {
		return nil, nil
	}
	defer func() {
		os.Unsetenv("LISTEN_PID")
		os.Unsetenv("LISTEN_FDS")
		os.Unsetenv("LISTEN_FDNAMES")
	}()
	pid, err := strconv.Atoi(pidS)
	if err != nil || pid <= 0 {
		return nil, fmt.Errorf("graceful: socket activation: LISTEN_PID=%q is not a process ID", pidS)
	}
	if pid != os.Getpid() {
		return nil, nil // meant for another process
	}
	n, err := strconv.Atoi(fdsS)
	if err != nil || n < 0 || n > maxActivated {
		return nil, fmt.Errorf("graceful: socket activation: LISTEN_FDS=%q is not a count between 0 and %d", fdsS, maxActivated)
	}
	var names []string
	if namesS != "" {
		names = strings.Split(namesS, ":")
		if len(names) != n {
			return nil, fmt.Errorf("graceful: socket activation: LISTEN_FDNAMES has %d names for LISTEN_FDS=%d", len(names), n)
		}
	}
	types := make([]int, n)
	for i := range n {
		fd := listenFdsStart + i
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil {
			return nil, fmt.Errorf("graceful: socket activation: LISTEN_FDS=%d but descriptor %d is not open", n, fd)
		}
		typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
		if err != nil {
			return nil, fmt.Errorf("graceful: socket activation: descriptor %d is not a socket: %w", fd, err)
		}
		switch typ {
		case unix.SOCK_STREAM:
			if acc, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN); err != nil || acc == 0 {
				return nil, fmt.Errorf("graceful: socket activation: descriptor %d is a stream socket that is not listening (Accept=yes is not supported)", fd)
			}
		case unix.SOCK_DGRAM:
		default:
			return nil, fmt.Errorf("graceful: socket activation: descriptor %d has unsupported socket type %d", fd, typ)
		}
		types[i] = typ
	}
	acts := make([]*activatedSocket, 0, n)
	for i, typ := range types {
		fd := listenFdsStart + i
		unix.CloseOnExec(fd)
		a := &activatedSocket{name: "LISTEN_FD_" + strconv.Itoa(fd)}
		if names != nil && names[i] != "" {
			a.name = names[i]
		}
		f := os.NewFile(uintptr(fd), a.name)
		if typ == unix.SOCK_STREAM {
			a.ln, err = net.FileListener(f)
		} else {
			a.pc, err = net.FilePacketConn(f)
		}
		f.Close() // FileListener and FilePacketConn hold their own duplicate
		if err != nil {
			for _, b := range acts {
				b.close()
			}
			return nil, fmt.Errorf("graceful: socket activation: descriptor %d: %w", fd, err)
		}
		acts = append(acts, a)
	}
	return acts, nil
}
