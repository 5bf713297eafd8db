# Boots the current OSTree deployment, or the previous one when the U-Boot
# variable rollback=1 is set or (on a board that counts boots) when the
# current one failed its tries. OSTree keeps /boot/loader/uEnv.txt on the
# rootfs partition pointing at the right files after every deploy, so this
# script never changes. Rendered by treeflash for board @BOARD@.
#
# It relies on nothing but U-Boot's own commands: every address and name it
# uses gets the board profile's value when the environment lacks it.
if test -z "${devtype}"; then setenv devtype @DEVTYPE@; fi
if test -z "${devnum}"; then setenv devnum @DEVNUM@; fi
@DEFAULTS@
setenv ostree_part ${devnum}:@ROOTFS_PART@

# Only what uEnv.txt says counts: forget values an earlier import or the
# board's own environment left behind.
setenv kernel_image
setenv ramdisk_image
setenv fdt_file
setenv fdtdir
setenv kernel_image2
setenv ramdisk_image2
setenv fdt_file2
setenv fdtdir2
setenv bootargs2

echo "treeflash: loading /boot/loader/uEnv.txt from ${devtype} ${ostree_part}"
load ${devtype} ${ostree_part} ${scriptaddr} /boot/loader/uEnv.txt || exit
env import -t ${scriptaddr} ${filesize}
setenv boot_entry 1
setenv treeflash_state none
if test "${rollback}" = "1"; then
  setenv boot_entry 2
  setenv treeflash_state manual
fi
@BOOT_COUNT@
if test "${boot_entry}" = "2"; then
  if test -n "${kernel_image2}"; then
    echo "treeflash: booting the previous deployment"
    setenv kernel_image ${kernel_image2}
    setenv ramdisk_image ${ramdisk_image2}
    setenv fdt_file ${fdt_file2}
    setenv fdtdir ${fdtdir2}
    setenv bootargs ${bootargs2}
  else
    echo "treeflash: there is no previous deployment; booting the current one"
  fi
fi
@BOOT_COUNT_ARGS@
if test -z "${kernel_image}"; then
  echo "treeflash: uEnv.txt names no kernel_image"
  exit
fi

echo "treeflash: kernel ${kernel_image}"
load ${devtype} ${ostree_part} ${kernel_addr_r} ${kernel_image} || exit
if test -n "${ramdisk_image}"; then
  echo "treeflash: initramfs ${ramdisk_image}"
  load ${devtype} ${ostree_part} ${ramdisk_addr_r} ${ramdisk_image} || exit
  setenv initrd ${ramdisk_addr_r}:${filesize}
else
  setenv initrd -
fi

# One devicetree (fdt_file), a folder of them (fdtdir: fdtfile picks one),
# or none in the commit (the board's fallback).
if test -n "${fdt_file}"; then
  echo "treeflash: devicetree ${fdt_file}"
  load ${devtype} ${ostree_part} ${fdt_addr_r} ${fdt_file} || exit
  setenv fdt ${fdt_addr_r}
elif test -n "${fdtdir}"; then
  if test -z "${fdtfile}"; then
    echo "treeflash: the deployment has several devicetrees (${fdtdir}) and fdtfile names none"
    exit
  fi
  echo "treeflash: devicetree ${fdtdir}/${fdtfile}"
  load ${devtype} ${ostree_part} ${fdt_addr_r} ${fdtdir}/${fdtfile} || exit
  setenv fdt ${fdt_addr_r}
else
@NO_DEVICETREE@
fi
booti ${kernel_addr_r} ${initrd} ${fdt}
